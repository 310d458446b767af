"""Strict SPIFFE ID and trust domain parsing (SPIFFE-ID spec; modelled on go-spiffe).

Accepted grammar (all ASCII, case-sensitive)::

    spiffe-id    = "spiffe://" trust-domain path        ; at most 2048 bytes
    trust-domain = 1*255( %x61-7A / DIGIT / "." / "-" / "_" )   ; lowercase only
    path         = *( "/" segment )
    segment      = 1*( ALPHA / DIGIT / "." / "-" / "_" ) ; but not "." or ".."

Everything else is rejected with a :class:`SpiffeIdError` whose ``rule`` names the
broken rule: uppercase (never lowercased for the caller: an ID that is not already
canonical is not an ID), percent-encoding, userinfo, port, query, fragment, empty,
``.``/``..`` segments, a trailing ``/``, whitespace and control characters, non-ASCII.

py-spiffe's ``spiffe.SpiffeId`` is lenient (mixed case, a trailing newline); use
:meth:`SpiffeId.from_py_spiffe` to re-check one strictly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mtls.errors import MtlsError

__all__ = [
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_BYTES",
    "SpiffeId",
    "SpiffeIdError",
    "SpiffeIdPattern",
    "TrustDomain",
    "parse_spiffe_id",
    "parse_trust_domain",
]

MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_SCHEME_PREFIX = "spiffe://"

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")

# Defense in depth: whatever the character-level checks accepted must also fullmatch
# these. fullmatch (not match + "$") so a trailing newline can never slip through.
_TD_RE = re.compile(r"[a-z0-9._-]+")
_PATH_RE = re.compile(r"(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+)*")
_ID_RE = re.compile(r"spiffe://[a-z0-9._-]+(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+)*")


class SpiffeIdError(MtlsError, ValueError):
    """A string is not a valid SPIFFE ID, trust domain or ID pattern.

    ``rule`` is a short, stable name of the broken rule (for exit messages, logs and
    tests); ``str(err)`` is a human message naming the rule and the offending part.
    """

    rule: str

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} [{rule}]")
        self.rule = rule


def _show(value: str, limit: int = 80) -> str:
    """repr() of a possibly hostile value, truncated so errors stay short."""
    if len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} chars)"
    return repr(value)


def _check_str(value: object, what: str, *, empty_rule: str = "empty") -> str:
    if not isinstance(value, str):
        raise SpiffeIdError("type", f"{what} must be str, not {type(value).__name__}")
    if not value:
        raise SpiffeIdError(empty_rule, f"{what} is empty")
    if not value.isascii():
        bad = next(c for c in value if not c.isascii())
        raise SpiffeIdError("non_ascii", f"{what} contains non-ASCII character {bad!r}")
    return value


def _describe_char(c: str) -> str:
    if c.isupper():
        return f"uppercase character {c!r}"
    if c.isspace():
        return f"whitespace character {c!r}"
    if not c.isprintable():
        return f"control character {c!r}"
    return f"character {c!r}"


def _validate_trust_domain_name(name: str, *, context: str = "trust domain") -> None:
    """Check an already ASCII trust domain name; raises SpiffeIdError."""
    if not name:
        raise SpiffeIdError("empty_trust_domain", f"{context} is empty")
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(
            "trust_domain_too_long",
            f"{context} is {len(name)} bytes, more than {MAX_TRUST_DOMAIN_BYTES}",
        )
    if all(c in _TD_CHARS for c in name):
        if _TD_RE.fullmatch(name) is None:  # pragma: no cover - same rule, stated twice
            raise SpiffeIdError("trust_domain_chars", f"{context} {_show(name)} is invalid")
        return
    # Name the most telling rule: these are URL authority parts a trust domain may not hold.
    if "@" in name:
        raise SpiffeIdError("userinfo", f"{context} {_show(name)} contains userinfo ('@')")
    if "[" in name or "]" in name:
        raise SpiffeIdError(
            "trust_domain_chars",
            f"{context} {_show(name)} is an IP literal; only [a-z0-9._-] are allowed",
        )
    if ":" in name:
        raise SpiffeIdError("port", f"{context} {_show(name)} contains a port (':')")
    if "%" in name:
        raise SpiffeIdError(
            "percent_encoding", f"{context} {_show(name)} contains percent-encoding"
        )
    bad = next(c for c in name if c not in _TD_CHARS)
    raise SpiffeIdError(
        "trust_domain_chars",
        f"{context} {_show(name)} contains {_describe_char(bad)}; only [a-z0-9._-] "
        "are allowed (uppercase is rejected, not lowercased)",
    )


def _validate_segment(segment: str, *, is_last: bool, path: str | None = None) -> None:
    where = f"path {_show(path)}" if path is not None else "path"
    if segment == "":
        if is_last:
            raise SpiffeIdError("trailing_slash", f"{where} ends with '/'")
        raise SpiffeIdError("empty_segment", f"{where} contains an empty segment ('//')")
    if segment in (".", ".."):
        raise SpiffeIdError("dot_segment", f"{where} contains a {segment!r} segment")
    for c in segment:
        if c not in _SEGMENT_CHARS:
            if c == "%":
                raise SpiffeIdError(
                    "percent_encoding",
                    f"path segment {_show(segment)} contains percent-encoding",
                )
            raise SpiffeIdError(
                "path_chars",
                f"path segment {_show(segment)} contains {_describe_char(c)}; "
                "only [a-zA-Z0-9._-] are allowed",
            )


def _validate_path(path: str) -> None:
    """Check a path ("" or "/seg/seg"), already ASCII."""
    if path == "":
        return
    if not path.startswith("/"):
        raise SpiffeIdError("path_chars", f"path {_show(path)} must start with '/'")
    segments = path[1:].split("/")
    for i, segment in enumerate(segments):
        _validate_segment(segment, is_last=i == len(segments) - 1, path=path)
    if _PATH_RE.fullmatch(path) is None:  # pragma: no cover - guarded above
        raise SpiffeIdError("path_chars", f"path {_show(path)} is invalid")


def _split_id(value: str, *, what: str = "SPIFFE ID") -> tuple[str, str]:
    """Split a str into (trust domain, path) after the ID-level checks; raises SpiffeIdError."""
    _check_str(value, what)
    if len(value) > MAX_SPIFFE_ID_BYTES:  # ASCII: characters == bytes
        raise SpiffeIdError(
            "too_long", f"{what} is {len(value)} bytes, more than {MAX_SPIFFE_ID_BYTES}"
        )
    if not value.startswith(_SCHEME_PREFIX):
        if value[: len(_SCHEME_PREFIX)].lower() == _SCHEME_PREFIX:
            raise SpiffeIdError(
                "scheme", f"{what} {_show(value)}: scheme must be lowercase 'spiffe://'"
            )
        raise SpiffeIdError("scheme", f"{what} {_show(value)} does not start with 'spiffe://'")
    rest = value[len(_SCHEME_PREFIX) :]
    # Query and fragment end the path in URL syntax: name them, whichever comes first.
    q, h = rest.find("?"), rest.find("#")
    if q >= 0 and (h < 0 or q < h):
        raise SpiffeIdError("query", f"{what} {_show(value)} contains a query ('?')")
    if h >= 0:
        raise SpiffeIdError("fragment", f"{what} {_show(value)} contains a fragment ('#')")
    slash = rest.find("/")
    if slash < 0:
        return rest, ""
    return rest[:slash], rest[slash:]


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name, e.g. ``example.org``. Always valid once constructed."""

    name: str

    def __post_init__(self) -> None:
        _check_str(self.name, "trust domain", empty_rule="empty_trust_domain")
        _validate_trust_domain_name(self.name)

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Parse ``example.org`` or ``spiffe://example.org``.

        Unlike go-spiffe's ``TrustDomainFromString``, an ID with a path
        (``spiffe://example.org/x``) is refused (rule ``trust_domain_has_path``): where a
        trust domain is expected, a workload ID is a configuration mistake.
        """
        _check_str(value, "trust domain", empty_rule="empty_trust_domain")
        if "://" in value or value.lower().startswith("spiffe:"):
            name, path = _split_id(value, what="trust domain")
            _validate_trust_domain_name(name)
            if path:
                raise SpiffeIdError(
                    "trust_domain_has_path",
                    f"trust domain {_show(value)} has a path; expected 'spiffe://{name}'",
                )
            return cls(name)
        return cls(value)

    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A strictly valid SPIFFE ID. ``path`` is ``""`` or ``"/seg/seg"``."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise SpiffeIdError(
                "type",
                f"trust_domain must be TrustDomain, not {type(self.trust_domain).__name__}",
            )
        if not isinstance(self.path, str):
            raise SpiffeIdError("type", f"path must be str, not {type(self.path).__name__}")
        if not self.path.isascii():
            raise SpiffeIdError("non_ascii", f"path {_show(self.path)} contains non-ASCII")
        _validate_path(self.path)
        total = len(_SCHEME_PREFIX) + len(self.trust_domain.name) + len(self.path)
        if total > MAX_SPIFFE_ID_BYTES:
            raise SpiffeIdError(
                "too_long", f"SPIFFE ID is {total} bytes, more than {MAX_SPIFFE_ID_BYTES}"
            )
        if _ID_RE.fullmatch(str(self)) is None:  # pragma: no cover - guarded above
            raise SpiffeIdError("invalid", f"SPIFFE ID {_show(str(self))} is invalid")

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse a SPIFFE ID strictly; raises :class:`SpiffeIdError`."""
        name, path = _split_id(value)
        _validate_trust_domain_name(name)
        return cls(TrustDomain(name), path)

    @classmethod
    def from_segments(cls, td: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build ``spiffe://td/seg1/seg2``; each segment is validated (no ``/`` inside)."""
        trust_domain = td if isinstance(td, TrustDomain) else TrustDomain.parse(td)
        for segment in segments:
            if not isinstance(segment, str):
                raise SpiffeIdError(
                    "type", f"path segment must be str, not {type(segment).__name__}"
                )
            if not segment.isascii():
                raise SpiffeIdError(
                    "non_ascii", f"path segment {_show(segment)} contains non-ASCII"
                )
            if "/" in segment:
                raise SpiffeIdError("path_chars", f"path segment {_show(segment)} contains '/'")
            _validate_segment(segment, is_last=False)
        return cls(trust_domain, "".join("/" + s for s in segments))

    @classmethod
    def from_py_spiffe(cls, obj: Any) -> SpiffeId:
        """Re-parse a py-spiffe ``SpiffeId`` (or anything whose ``str()`` is an ID) strictly."""
        return cls.parse(str(obj))

    @property
    def segments(self) -> tuple[str, ...]:
        """Path segments, ``()`` for the trust domain's own ID."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    def member_of(self, td: TrustDomain) -> bool:
        """True if this ID belongs to trust domain ``td``."""
        return isinstance(td, TrustDomain) and self.trust_domain.name == td.name

    def __str__(self) -> str:
        return _SCHEME_PREFIX + self.trust_domain.name + self.path


@dataclass(frozen=True, slots=True)
class SpiffeIdPattern:
    """An authorization pattern over SPIFFE IDs, as written in configuration files.

    Forms:

    * exact: ``spiffe://acme.prod/agent/planner`` matches only that ID
      (``spiffe://acme.prod`` matches only the trust domain's own ID);
    * ``*`` as a whole segment matches exactly one segment:
      ``spiffe://acme.prod/agent/*`` matches ``.../agent/planner`` but neither
      ``.../agent`` nor ``.../agent/planner/x``;
    * ``**`` as the last segment matches one or more remaining segments:
      ``spiffe://acme.prod/agent/**`` matches ``.../agent/a`` and ``.../agent/a/b``,
      not ``.../agent``; ``spiffe://acme.prod/**`` is any workload in the trust domain
      (but not the trust domain's own ID).

    Rejected (``SpiffeIdError``): wildcards inside a segment (``agent-*``, rule
    ``partial_wildcard``), ``**`` anywhere but last (``wildcard_position``), any
    wildcard in the trust domain (``wildcard_trust_domain``). Literal parts follow the
    same strict rules as :class:`SpiffeId`. The trust domain always matches exactly.
    """

    trust_domain: TrustDomain
    segments: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise SpiffeIdError(
                "type",
                f"trust_domain must be TrustDomain, not {type(self.trust_domain).__name__}",
            )
        if not isinstance(self.segments, tuple) or not all(
            isinstance(s, str) for s in self.segments
        ):
            raise SpiffeIdError("type", "segments must be a tuple of str")
        shown = _show(str(self))
        for i, segment in enumerate(self.segments):
            last = i == len(self.segments) - 1
            if segment == "**":
                if not last:
                    raise SpiffeIdError(
                        "wildcard_position",
                        f"pattern {shown}: '**' is only allowed as the last segment",
                    )
            elif segment == "*":
                pass
            elif "*" in segment:
                raise SpiffeIdError(
                    "partial_wildcard",
                    f"pattern {shown}: segment {_show(segment)} mixes '*' with other "
                    "characters; wildcards must be a whole segment",
                )
            else:
                if not segment.isascii():
                    raise SpiffeIdError(
                        "non_ascii", f"pattern segment {_show(segment)} contains non-ASCII"
                    )
                if "/" in segment:
                    raise SpiffeIdError(
                        "path_chars", f"pattern segment {_show(segment)} contains '/'"
                    )
                _validate_segment(segment, is_last=last, path=str(self))
        if len(str(self)) > MAX_SPIFFE_ID_BYTES:
            raise SpiffeIdError("too_long", f"pattern is longer than {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, pattern: str) -> SpiffeIdPattern:
        """Parse a pattern (see the class docstring); raises :class:`SpiffeIdError`."""
        name, path = _split_id(pattern, what="SPIFFE ID pattern")
        if "*" in name:
            raise SpiffeIdError(
                "wildcard_trust_domain",
                f"pattern {_show(pattern)}: wildcards are not allowed in the trust domain",
            )
        _validate_trust_domain_name(name)
        segments = tuple(path[1:].split("/")) if path else ()
        return cls(TrustDomain(name), segments)

    def matches(self, spiffe_id: SpiffeId | str) -> bool:
        """True if ``spiffe_id`` matches; a str is parsed strictly and invalid -> False."""
        if isinstance(spiffe_id, str):
            try:
                spiffe_id = SpiffeId.parse(spiffe_id)
            except SpiffeIdError:
                return False
        if not isinstance(spiffe_id, SpiffeId):
            return False
        if spiffe_id.trust_domain.name != self.trust_domain.name:
            return False
        want = self.segments
        have = spiffe_id.segments
        if want and want[-1] == "**":
            fixed = want[:-1]
            if len(have) <= len(fixed):  # '**' needs at least one segment
                return False
            have = have[: len(fixed)]
            want = fixed
        if len(have) != len(want):
            return False
        return all(w == "*" or w == h for w, h in zip(want, have, strict=True))

    def __str__(self) -> str:
        return _SCHEME_PREFIX + self.trust_domain.name + "".join("/" + s for s in self.segments)


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse a SPIFFE ID strictly; raises :class:`SpiffeIdError`."""
    return SpiffeId.parse(value)


def parse_trust_domain(value: str) -> TrustDomain:
    """Parse ``example.org`` or ``spiffe://example.org``; raises :class:`SpiffeIdError`."""
    return TrustDomain.parse(value)
