"""The version of nbfunc (read by pyproject.toml, `nbfunc.__version__` and ``nbfunc --version``)."""
__version__ = "0.1.0"
