"""The version of jaxembed (one place; the package, config.json and the wheel read it)."""

__version__ = "0.1.0"
