"""Strict YAML loading for AXID's security configuration (issuer, registrations, verifier).

PyYAML's ``safe_load`` is not strict enough for security configuration: it keeps
the last of duplicate keys (so a reviewer and the program can read different
values) and it expands aliases (``&a``/``*a``), which lets a small file become a
huge structure. Here both are errors, and the input size is capped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from axid.errors import AxidError

__all__ = ["MAX_YAML_BYTES", "YamlError", "load_yaml", "read_yaml_file"]

MAX_YAML_BYTES: Final = 1024 * 1024


class YamlError(AxidError, ValueError):
    """The text is not one strict YAML document (see the module docstring)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases and without duplicate mapping keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConstructorError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            # Merge keys ("<<") would copy mappings in by reference: refused like aliases.
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(
                        None, None, "merge keys (<<) are not allowed", key_node.start_mark
                    )
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    raise ConstructorError(
                        None, None, "mapping key is not a scalar", key_node.start_mark
                    ) from None
                if duplicate:
                    raise ConstructorError(
                        None, None, f"duplicate key {_show(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_yaml(text: str | bytes, *, what: str = "YAML") -> Any:
    """Parse one YAML document strictly; every failure is a :class:`YamlError`."""
    if isinstance(text, bytes):
        if len(text) > MAX_YAML_BYTES:
            raise YamlError(f"{what} is larger than {MAX_YAML_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise YamlError(f"{what} is not UTF-8") from None
    if not isinstance(text, str):
        raise YamlError(f"{what} must be text")
    if len(text) > MAX_YAML_BYTES:
        raise YamlError(f"{what} is larger than {MAX_YAML_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise YamlError(f"{what}: {problem}{where}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors raise these for e.g. impossible dates or deep nesting.
        raise YamlError(f"{what}: invalid value ({type(exc).__name__})") from None


def read_yaml_file(path: str | os.PathLike[str], *, what: str | None = None) -> Any:
    """Read and strictly parse a YAML file (at most :data:`MAX_YAML_BYTES`)."""
    p = Path(path)
    label = what or str(p)
    try:
        with p.open("rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise YamlError(f"cannot read {label}: {exc.strerror or exc}") from None
    return load_yaml(data, what=label)
