"""Batch serving with the registered model: predictions and features for a folder or archive."""
