"""Strict parser for Envoy's ``x-forwarded-client-cert`` (XFCC) header.

Format (Envoy docs, "HTTP header manipulation"): the header is a ``,``-separated list of
elements, each added by one proxy (the last one by the nearest proxy). An element is a
``;``-separated list of ``key=value`` pairs; keys are case-insensitive, values
case-sensitive. A value holding ``,``, ``;`` or ``=`` is double-quoted, and a ``"`` inside
quotes is written ``\\"``. Known keys:

==========  =====================================================  ============
key         value                                                  repeats?
==========  =====================================================  ============
``By``      URI SAN of the proxy's own certificate                 yes
``Hash``    hex SHA-256 of the client certificate's DER            no
``Cert``    client certificate, URL-encoded PEM                    no
``Chain``   client chain (leaf included), URL-encoded PEM          no
``Subject`` subject of the client certificate (always quoted)      no
``URI``     URI SAN of the client certificate                      yes
``DNS``     DNS SAN of the client certificate                      yes
==========  =====================================================  ============

What this parser accepts (anything else raises :class:`XfccError`, the only exception it
raises):

* printable ASCII only; optional spaces/tabs only around the ``,`` between elements
  (where HTTP intermediaries put them when joining header lines);
* keys of ``[A-Za-z0-9_.-]``; unknown keys are ignored (Envoy may add new ones) but must
  be well-formed; a single-valued key may not repeat within an element;
* unquoted values may not contain ``"``, ``\\``, ``,``, ``;`` or whitespace (``=`` is
  allowed: Envoy does not quote ``By``/``URI`` values and the key ends at the first ``=``);
* inside quotes ``\\"`` is ``"`` and ``\\\\`` is ``\\``; any other backslash pair is kept
  verbatim (Envoy copies RFC 2253 subjects, whose ``\\,`` escapes must survive);
* ``Hash`` is 64 hex digits (returned lowercase) and, with ``Cert``, must equal the
  SHA-256 of the certificate's DER;
* ``Cert`` URL-decodes to exactly one PEM ``CERTIFICATE`` block and ``Chain`` to one or
  more, nothing else; percent escapes must be well-formed. The certificate itself is not
  parsed or verified here: that is the SVID verifier's job;
* empty ``By``/``URI``/``DNS`` values (older Envoy emitted ``URI=`` for no SAN) carry no
  identity and are dropped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from mtls.errors import MtlsError

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_LENGTH",
    "XfccElement",
    "XfccError",
    "last_element",
    "parse_xfcc",
]

DEFAULT_MAX_LENGTH = 64 * 1024
DEFAULT_MAX_ELEMENTS = 32

_BAD_CHAR_RE = re.compile(r"[^\x20-\x7e\t]")
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Alternatives are disjoint on their first character, so matching is linear.
_QUOTED_RE = re.compile(r'"((?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*)"')
_UNQUOTED_RE = re.compile(r'[^"\\,;\x00-\x20\x7f]*')
_UNESCAPE_RE = re.compile(r'\\(["\\])')
_OWS_RE = re.compile(r"[ \t]*")
_HASH_RE = re.compile(r"[0-9a-fA-F]{64}")
_PCT_BAD_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
# Base64 lines, each ending in a line break; no blank lines, no headers.
_PEM_BLOCK_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n"
    r"((?:[A-Za-z0-9+/=]+\r?\n)+)"
    r"-----END CERTIFICATE-----(?:\r?\n)?"
)
_PEM_WS_RE = re.compile(r"[\r\n]*")

_SINGLE_KEYS = frozenset({"hash", "cert", "chain", "subject"})


class XfccError(MtlsError, ValueError):
    """The XFCC header is malformed. ``rule`` is a short stable name of what is wrong."""

    rule: str

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} [{rule}]")
        self.rule = rule


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One XFCC element: what one proxy says about the client it saw."""

    by: tuple[str, ...] = ()
    hash: str | None = None  # lowercase hex SHA-256 of the client cert's DER
    cert_pem: bytes | None = None  # exactly one PEM CERTIFICATE block
    chain_pem: tuple[bytes, ...] = ()  # one PEM block per certificate, leaf first
    subject: str | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


def _at(value: str, pos: int) -> str:
    """Short description of the input at ``pos`` for error messages."""
    if pos >= len(value):
        return "at end of header"
    return f"at offset {pos} ({value[pos]!r})"


def _quoted_error(value: str, start: int) -> XfccError:
    """Explain why a quoted string starting at ``start`` did not match."""
    i = start + 1
    while i < len(value):
        c = value[i]
        if c == '"':  # pragma: no cover - a closed string would have matched
            break
        if c == "\\":
            if i + 1 >= len(value):
                break
            nxt = value[i + 1]
            if not ("\x20" <= nxt <= "\x7e"):
                return XfccError(
                    "bad_escape", f"backslash before {nxt!r} in quoted value at offset {i}"
                )
            i += 2
            continue
        if c < "\x20" or c == "\x7f":
            return XfccError(
                "control_char", f"control character {c!r} in quoted value at offset {i}"
            )
        i += 1
    return XfccError("unterminated_quote", f"quoted value starting at offset {start} never ends")


def _pct_decode(text: str, key: str) -> bytes:
    """Strict URL decoding: every ``%`` must start a two-hex-digit escape."""
    bad = _PCT_BAD_RE.search(text)
    if bad is not None:
        raise XfccError(
            "bad_percent_encoding",
            f"{key} value has a malformed percent escape at offset {bad.start()}",
        )
    decoded = _PCT_RE.sub(lambda m: chr(int(m.group(1), 16)), text)
    if not decoded.isascii():
        raise XfccError("bad_pem", f"{key} value decodes to non-ASCII bytes")
    return decoded.encode("latin-1")


def _pem_blocks(text: str, key: str) -> list[tuple[bytes, bytes]]:
    """Split decoded PEM into (block bytes, DER); only CERTIFICATE blocks, nothing else."""
    blocks: list[tuple[bytes, bytes]] = []
    pos = _PEM_WS_RE.match(text).end()  # type: ignore[union-attr]
    while pos < len(text):
        m = _PEM_BLOCK_RE.match(text, pos)
        if m is None:
            raise XfccError(
                "bad_pem",
                f"{key} value is not a sequence of PEM CERTIFICATE blocks "
                f"(unexpected content at offset {pos} of the decoded PEM)",
            )
        body = m.group(1).replace("\r", "").replace("\n", "")
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise XfccError("bad_pem", f"{key} value has a PEM block with bad base64") from None
        if not der:
            raise XfccError("bad_pem", f"{key} value has an empty PEM block")
        block = m.group(0)
        if not block.endswith("\n"):
            block += "\n"
        blocks.append((block.encode("ascii"), der))
        pos = _PEM_WS_RE.match(text, m.end()).end()  # type: ignore[union-attr]
    return blocks


def _decode_pem(raw: str, key: str) -> list[tuple[bytes, bytes]]:
    if raw == "":
        raise XfccError("bad_pem", f"{key} value is empty")
    decoded = _pct_decode(raw, key).decode("ascii")
    return _pem_blocks(decoded, key)


def _build_element(pairs: list[tuple[str, str]], index: int) -> XfccElement:
    by: list[str] = []
    uris: list[str] = []
    dns: list[str] = []
    single: dict[str, str] = {}
    for key, val in pairs:
        k = key.lower()
        if k in _SINGLE_KEYS:
            if k in single:
                raise XfccError("duplicate_key", f"element {index} has more than one {key!r} pair")
            single[k] = val
        elif k in ("by", "uri", "dns") and val:  # an empty SAN value names nobody
            {"by": by, "uri": uris, "dns": dns}[k].append(val)
        # Unknown keys: accepted (Envoy may add new ones) and ignored.

    digest: str | None = None
    if "hash" in single:
        h = single["hash"]
        if _HASH_RE.fullmatch(h) is None:
            raise XfccError(
                "bad_hash", f"element {index}: Hash must be 64 hex digits, got {len(h)} chars"
            )
        digest = h.lower()

    cert_pem: bytes | None = None
    if "cert" in single:
        blocks = _decode_pem(single["cert"], "Cert")
        if len(blocks) != 1:
            raise XfccError(
                "bad_pem",
                f"element {index}: Cert must hold exactly one certificate, got {len(blocks)}",
            )
        cert_pem, der = blocks[0]
        if digest is not None and not hmac.compare_digest(digest, hashlib.sha256(der).hexdigest()):
            raise XfccError(
                "hash_mismatch", f"element {index}: Hash is not the SHA-256 of the Cert's DER"
            )

    chain_pem: tuple[bytes, ...] = ()
    if "chain" in single:
        chain_pem = tuple(block for block, _ in _decode_pem(single["chain"], "Chain"))
        if not chain_pem:
            raise XfccError("bad_pem", f"element {index}: Chain holds no certificate")

    return XfccElement(
        by=tuple(by),
        hash=digest,
        cert_pem=cert_pem,
        chain_pem=chain_pem,
        subject=single.get("subject"),
        uris=tuple(uris),
        dns=tuple(dns),
    )


def parse_xfcc(
    value: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[XfccElement, ...]:
    """Parse a whole XFCC header value into its elements, first (farthest proxy) first.

    ``bytes`` are accepted too (as ASGI gives headers) and must be ASCII. Raises
    :class:`XfccError` and nothing else.
    """
    value = _checked_text(value, max_length)
    elements: list[XfccElement] = []
    pos = 0
    end = len(value)
    while True:
        if len(elements) >= max_elements:
            raise XfccError("too_many_elements", f"header has more than {max_elements} elements")
        pairs, pos = _element_pairs(value, pos)
        elements.append(_build_element(pairs, len(elements)))
        if pos == end:
            break
        after_ows = _OWS_RE.match(value, pos).end()  # type: ignore[union-attr]
        if after_ows < end and value[after_ows] == ",":
            pos = _OWS_RE.match(value, after_ows + 1).end()  # type: ignore[union-attr]
            continue
        raise XfccError("unexpected_char", f"unexpected character {_at(value, pos)}")
    return tuple(elements)


def _checked_text(value: object, max_length: int) -> str:
    """The header as text: ASCII, within ``max_length``, not empty, no control
    character (checked before any parsing of attacker-controlled input)."""
    if isinstance(value, bytes | bytearray):
        if len(value) > max_length:
            raise XfccError("too_long", f"header is {len(value)} bytes, limit {max_length}")
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise XfccError("bad_char", "header contains non-ASCII bytes") from None
    if not isinstance(value, str):
        raise XfccError("type", f"header must be str or bytes, not {type(value).__name__}")
    # Size first, before any other work on attacker-controlled input.
    if len(value) > max_length:
        raise XfccError("too_long", f"header is {len(value)} chars, limit {max_length}")
    if value == "":
        raise XfccError("empty", "header is empty")
    bad = _BAD_CHAR_RE.search(value)
    if bad is not None:
        c = bad.group()
        kind = "non-ASCII" if not c.isascii() else "control"
        raise XfccError("bad_char", f"{kind} character {c!r} at offset {bad.start()}")
    return value


def _element_pairs(value: str, pos: int) -> tuple[list[tuple[str, str]], int]:
    """The ``key=value`` pairs (``;``-separated) of the element at ``pos``, and the
    position after them."""
    end = len(value)
    pairs: list[tuple[str, str]] = []
    while True:
        m = _KEY_RE.match(value, pos)
        if m is None:
            if pos >= end or value[pos] in ",;=":
                raise XfccError("empty_key", f"empty key or element {_at(value, pos)}")
            raise XfccError("bad_key", f"invalid key character {_at(value, pos)}")
        key = m.group()
        pos = m.end()
        if pos >= end or value[pos] != "=":
            raise XfccError("missing_equals", f"key {key!r} not followed by '=' {_at(value, pos)}")
        pos += 1
        if pos < end and value[pos] == '"':
            q = _QUOTED_RE.match(value, pos)
            if q is None:
                raise _quoted_error(value, pos)
            val = _UNESCAPE_RE.sub(r"\1", q.group(1))
            pos = q.end()
        else:
            u = _UNQUOTED_RE.match(value, pos)
            val = u.group()  # type: ignore[union-attr]  # '*' always matches
            pos = u.end()  # type: ignore[union-attr]
        pairs.append((key, val))
        if pos < end and value[pos] == ";":
            pos += 1
            continue
        break
    return pairs, pos


def last_element(
    value: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> XfccElement:
    """The last element: the one added by the nearest proxy (the one we trust).

    The whole header must parse: a malformed earlier element fails the request too.
    """
    return parse_xfcc(value, max_length=max_length, max_elements=max_elements)[-1]
