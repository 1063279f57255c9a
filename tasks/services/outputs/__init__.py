"""Where stages write: repository paths, the Parquet feature store, plots, the selective report."""
