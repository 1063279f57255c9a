"""MLflow: stage runs under a pipeline run, the pyfunc model, which registered model a job uses."""
