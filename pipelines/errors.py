"""Typed errors a user can act on. Stage CLIs print the message and exit non-zero."""


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose (bad input, failed gate)."""


class ParamsError(PipelineError, ValueError):
    """params.yaml (or an override) has an unknown key or a bad value."""


class DataSourceError(PipelineError):
    """The configured data source cannot be read as a table."""


class DataValidationError(PipelineError):
    """The data failed the Great Expectations gate; the message lists each failed expectation."""


class FeatureError(PipelineError, ValueError):
    """Prepared rows cannot become model input: a non-numeric feature value, or a column count
    that does not fit the model's input shape."""


class CheckpointError(PipelineError):
    """A checkpoint or model file cannot be used."""


class ParityError(PipelineError):
    """A converted model (ONNX, quantized, TensorRT) disagrees with its source beyond the gate."""


class SelectionError(PipelineError):
    """No candidate model satisfies the selection policy."""


class InUseError(PipelineError):
    """State a stage keeps between runs (checkpoints, a study) is held by another process."""


class StorageError(PipelineError):
    """A database a stage keeps its state in (the tuning study) cannot be opened."""


class EnvironmentVariableError(ParamsError):
    """An environment variable the project reads (`pipelines.config.Environment`) has a bad
    value; the message names the variable, never its value."""


class ReferenceProfileError(PipelineError):
    """A reference profile folder is missing a file or holds one that does not fit the format
    (pipelines/reference.py); the message names the file."""
