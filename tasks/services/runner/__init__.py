"""Running stages: the stage entry point and exit codes, the process environment, DVC, Prefect, the run lock."""
