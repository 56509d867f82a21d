"""The Prefect flows over the pipeline's stages.

`pipelines` is imported first: it sets the telemetry switches before any flow module imports
Prefect or MLflow, `python -m flows.<name>` included."""

import pipelines  # noqa: F401
