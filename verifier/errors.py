"""The base of every error :mod:`verifier` raises, and its configuration error."""

from __future__ import annotations

__all__ = ["ConfigError", "VerifierError"]


class VerifierError(Exception):
    """A verifier configuration, key set, revocation feed, peer identity or log read problem.

    One error class per package (as in go-spiffe): each concrete error also keeps its
    own base (``ValueError`` for ``ConfigError``), so code that catches those goes on
    catching them.
    """


class ConfigError(VerifierError, ValueError):
    """A verifier configuration (file, mapping, rule or code) is invalid.

    ``key`` is the dotted path of the offending key (``rules[2].methods``) when
    the problem is about one key, else ``None``.
    """

    key: str | None

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """The same error, its key nested under ``prefix`` (``rules[2]`` + ``methods``)."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(self.message, key=key)
