"""The version of optimum-sparsesched (one place: pyproject.toml reads it, the model card prints it)."""

__version__ = "0.1.0"
