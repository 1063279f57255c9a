"""What the stages (``tasks/<stage>.py``) share: params, outputs, MLflow, the runner, batch serving.

Nothing here is a stage; a stage is a module of ``tasks/`` that DVC runs as ``python -m tasks.<stage>``."""
