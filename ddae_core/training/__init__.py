"""Pretraining: the Accelerate loop with checkpoint rotation and exact resume, the EMA, the lr schedule."""
