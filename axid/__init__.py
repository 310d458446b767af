"""AXID: action tokens, keys, the issuer service and the decision log."""

from axid.errors import AxidError

__version__ = "0.1.0"

__all__ = ["AxidError", "__version__"]
