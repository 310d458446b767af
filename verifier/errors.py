"""The one exception type of verifier configuration."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
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
