"""The registration file: which workload may ask the issuer for which tokens.

YAML, one entry per SPIFFE ID pattern; the first entry whose pattern matches the
caller's SPIFFE ID decides (a caller that matches none is not registered)::

    registrations:
      - spiffe_id: "spiffe://example.org/agent/planner"   # exact ID or pattern (*, **)
        tenant: acme                                      # the tenant of every token
        agents: [planner]                                 # agent slugs it may mint for
        audiences: [payments]                             # services it may address
        scope: "payments:read payments:refund"            # the widest scope it may ask
        spawn_from:                                       # whose tokens may parent, see below
          - "spiffe://example.org/agent/planner"

Rules (everything else is a :class:`RegistryError` naming the entry and key):

* top level: exactly the key ``registrations``, a list (may be empty);
* each entry has the five keys ``spiffe_id``, ``tenant``, ``agents``, ``audiences``,
  ``scope`` (all required) and optionally ``spawn_from``; no other key;
* ``spiffe_id``: a strict SPIFFE ID or :class:`~mtls.spiffeid.SpiffeIdPattern`
  (``*`` one whole segment, ``**`` as last segment); no two entries with the same one;
* ``tenant`` and each agent: a slug ``[a-z0-9][a-z0-9-]{0,62}``;
* ``audiences``: non-empty list of service names ``[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}``;
* ``scope``: RFC 6749 scope tokens, a space-separated string or a list, non-empty,
  no duplicates;
* ``spawn_from`` (optional): a list of strict SPIFFE ID patterns, no duplicates, none
  naming a bare trust domain; ``null`` is an error, not "absent".
* no duplicate keys, aliases or merge keys anywhere (strict YAML).

``spawn_from`` and parent tokens (explicit delegation, DESIGN.md "Minting rules"): a
workload mints a child under a parent token only when the parent token's ``sub`` (the
workload the parent was minted for) matches one of its ``spawn_from`` patterns.
Without ``spawn_from`` (the default), or with an empty list, the workload spawns from
nobody: it mints root tokens only. Otherwise the mint is refused with 403
``spawn_not_allowed``. A parent token is a bearer credential, so holding one is not
enough: the planner's token handed to (or stolen by) another workload of the tenant
parents nothing unless that workload's registration names the planner. Either way
the parent's ``sub``, ``jti`` and ``run`` are recorded in the decision log's ``note``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from axid._yaml import YamlError, load_yaml, read_yaml_file
from axid.issuer.errors import IssuerBaseError
from mtls.spiffeid import SpiffeId, SpiffeIdError, SpiffeIdPattern

__all__ = [
    "AUDIENCE_RE",
    "SCOPE_TOKEN_RE",
    "SLUG_RE",
    "Registration",
    "Registry",
    "RegistryError",
    "parse_scope",
]

SLUG_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
AUDIENCE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN_RE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
_MAX_SCOPE_TOKENS: Final = 256
_MAX_LIST: Final = 1024
_REQUIRED_KEYS: Final = ("spiffe_id", "tenant", "agents", "audiences", "scope")
_ENTRY_KEYS: Final = (*_REQUIRED_KEYS, "spawn_from")


class RegistryError(IssuerBaseError, ValueError):
    """The registration file is invalid. ``index`` and ``key`` locate the problem
    (``None`` when it is not about one entry or key)."""

    index: int | None
    key: str | None

    def __init__(self, message: str, *, index: int | None = None, key: str | None = None) -> None:
        where = ""
        if index is not None:
            where = f"registrations[{index}]"
            if key is not None:
                where += f".{key}"
            where += ": "
        elif key is not None:
            where = f"{key}: "
        super().__init__(where + message)
        self.index = index
        self.key = key


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_scope(value: object) -> frozenset[str]:
    """A scope (space-separated string, or list of tokens) -> its set of actions.

    Raises ValueError: not a string/list, empty, a token that is not an RFC 6749
    scope token, a duplicate, more than 256 tokens.
    """
    if isinstance(value, str):
        items: list[object] = list(value.split(" "))
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError("scope must be a space-separated string or a list of scope tokens")
    if not items or items == [""]:
        raise ValueError("scope is empty")
    if len(items) > _MAX_SCOPE_TOKENS:
        raise ValueError(f"scope has more than {_MAX_SCOPE_TOKENS} tokens")
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or SCOPE_TOKEN_RE.fullmatch(item) is None:
            raise ValueError(
                f"scope token {_show(item)} is not an RFC 6749 scope token"
                " (single spaces between tokens)"
            )
        if item in seen:
            raise ValueError(f"scope repeats {item!r}")
        seen.add(item)
    return frozenset(seen)


@dataclass(frozen=True, slots=True)
class Registration:
    """One entry of the registration file."""

    index: int
    pattern: SpiffeIdPattern
    tenant: str
    agents: frozenset[str]
    audiences: frozenset[str]
    scope: frozenset[str]
    # None (absent) and () alike: no workload may be the parent (module docstring).
    spawn_from: tuple[SpiffeIdPattern, ...] | None = None

    @property
    def rule(self) -> str:
        """The entry's pattern as written: recorded as the decision log's ``rule``."""
        return str(self.pattern)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        return self.pattern.matches(spiffe_id)

    def may_spawn_from(self, parent_sub: SpiffeId | str) -> bool:
        """May a parent token minted for ``parent_sub`` parent this workload's runs?

        Only when ``parent_sub`` matches one of the ``spawn_from`` patterns (a str is
        parsed strictly; an invalid one never matches). Without ``spawn_from``: never.
        """
        return any(p.matches(parent_sub) for p in self.spawn_from or ())


def _slug(value: object, index: int, key: str) -> str:
    if not isinstance(value, str) or SLUG_RE.fullmatch(value) is None:
        raise RegistryError(
            f"{_show(value)} is not a slug [a-z0-9][a-z0-9-]{{0,62}}", index=index, key=key
        )
    return value


def _string_list(value: object, index: int, key: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise RegistryError("must be a non-empty list", index=index, key=key)
    if len(value) > _MAX_LIST:
        raise RegistryError(f"has more than {_MAX_LIST} items", index=index, key=key)
    return value


def _entry(raw: object, index: int) -> Registration:
    if not isinstance(raw, Mapping):
        raise RegistryError("must be a mapping", index=index)
    for key in raw:
        if key not in _ENTRY_KEYS:
            raise RegistryError(
                f"unknown key {_show(key)} (allowed: {', '.join(_ENTRY_KEYS)})",
                index=index,
                key=str(key)[:60],
            )
    for key in _REQUIRED_KEYS:
        if key not in raw:
            raise RegistryError("is required", index=index, key=key)
    pattern = _workload_pattern(raw["spiffe_id"], index, "spiffe_id")
    tenant = _slug(raw["tenant"], index, "tenant")
    agents: set[str] = set()
    for item in _string_list(raw["agents"], index, "agents"):
        agent = _slug(item, index, "agents")
        if agent in agents:
            raise RegistryError(f"repeats {agent!r}", index=index, key="agents")
        agents.add(agent)
    audiences: set[str] = set()
    for item in _string_list(raw["audiences"], index, "audiences"):
        if not isinstance(item, str) or AUDIENCE_RE.fullmatch(item) is None:
            raise RegistryError(
                f"{_show(item)} is not a service name [A-Za-z0-9][A-Za-z0-9._:/-]{{0,254}}",
                index=index,
                key="audiences",
            )
        if item in audiences:
            raise RegistryError(f"repeats {item!r}", index=index, key="audiences")
        audiences.add(item)
    try:
        scope = parse_scope(raw["scope"])
    except ValueError as exc:
        raise RegistryError(str(exc), index=index, key="scope") from None
    spawn_from = _spawn_from(raw["spawn_from"], index) if "spawn_from" in raw else None
    return Registration(
        index, pattern, tenant, frozenset(agents), frozenset(audiences), scope, spawn_from
    )


def _workload_pattern(value: object, index: int, key: str) -> SpiffeIdPattern:
    if not isinstance(value, str):
        raise RegistryError("must be a string", index=index, key=key)
    try:
        pattern = SpiffeIdPattern.parse(value)
    except SpiffeIdError as exc:
        raise RegistryError(f"invalid SPIFFE ID pattern: {exc}", index=index, key=key) from None
    if not pattern.segments:
        # The trust domain's own ID is never an X.509-SVID: such an entry is a mistake.
        raise RegistryError(
            "names a trust domain, not a workload (add a path)", index=index, key=key
        )
    return pattern


def _spawn_from(value: object, index: int) -> tuple[SpiffeIdPattern, ...]:
    # Empty is allowed (root tokens only); null is not: absence must be spelled as absence.
    if not isinstance(value, list):
        raise RegistryError("must be a list of SPIFFE ID patterns", index=index, key="spawn_from")
    if len(value) > _MAX_LIST:
        raise RegistryError(f"has more than {_MAX_LIST} items", index=index, key="spawn_from")
    patterns: list[SpiffeIdPattern] = []
    for item in value:
        pattern = _workload_pattern(item, index, "spawn_from")
        if pattern in patterns:
            raise RegistryError(f"repeats {str(pattern)!r}", index=index, key="spawn_from")
        patterns.append(pattern)
    return tuple(patterns)


class Registry:
    """The parsed registration file; immutable. ``match`` is first-match-wins."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[Registration] = ()) -> None:
        self._entries: tuple[Registration, ...] = tuple(entries)

    @classmethod
    def from_mapping(cls, doc: object) -> Registry:
        """Build from an already-parsed document (``{"registrations": [...]}``)."""
        if not isinstance(doc, Mapping):
            raise RegistryError("the document must be a mapping with the key 'registrations'")
        for key in doc:
            if key != "registrations":
                raise RegistryError(
                    f"unknown top-level key {_show(key)} (allowed: registrations)",
                    key=str(key)[:60],
                )
        if "registrations" not in doc:
            raise RegistryError("is required", key="registrations")
        raw = doc["registrations"]
        if not isinstance(raw, list):
            raise RegistryError("must be a list", key="registrations")
        if len(raw) > _MAX_LIST:
            raise RegistryError(f"has more than {_MAX_LIST} entries", key="registrations")
        entries: list[Registration] = []
        patterns: dict[str, int] = {}
        for index, item in enumerate(raw):
            entry = _entry(item, index)
            first = patterns.setdefault(entry.rule, index)
            if first != index:
                raise RegistryError(
                    f"same spiffe_id as registrations[{first}]; the later one would never match",
                    index=index,
                    key="spiffe_id",
                )
            entries.append(entry)
        return cls(entries)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> Registry:
        """Parse registration YAML; any problem is a :class:`RegistryError`."""
        try:
            doc = load_yaml(text, what="registration file")
        except YamlError as exc:
            raise RegistryError(str(exc)) from None
        return cls.from_mapping(doc)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Registry:
        try:
            doc = read_yaml_file(path)
        except YamlError as exc:
            raise RegistryError(str(exc)) from None
        return cls.from_mapping(doc)

    def match(self, spiffe_id: SpiffeId) -> Registration | None:
        """The first registration whose pattern matches ``spiffe_id``, or None."""
        for entry in self._entries:
            if entry.pattern.matches(spiffe_id):
                return entry
        return None

    def __iter__(self) -> Iterator[Registration]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({[e.rule for e in self._entries]!r})"
