"""AXID: action tokens, keys, the issuer service and the decision log."""

__version__ = "0.1.0"

__all__ = ["__version__"]
