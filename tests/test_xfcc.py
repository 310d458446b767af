"""Envoy x-forwarded-client-cert parsing (mtls.xfcc): examples, malformed table, fuzz."""

from __future__ import annotations

import contextlib
import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtls.xfcc import XfccElement, XfccError, last_element, parse_xfcc


def _self_signed(common_name: str, uri: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def envoy_url_encode(pem: bytes) -> str:
    """What Envoy does to a PEM (ConnectionInfoImplBase::urlEncodedPemEncodedPeerCertificate)."""
    text = pem.decode("ascii")
    for raw, enc in (("\n", "%0A"), (" ", "%20"), ("+", "%2B"), ("/", "%2F"), ("=", "%3D")):
        text = text.replace(raw, enc)
    return text


LEAF = _self_signed("planner", "spiffe://example.org/agent/planner")
CA = _self_signed("ca", "spiffe://example.org")
LEAF_PEM = LEAF.public_bytes(serialization.Encoding.PEM)
CA_PEM = CA.public_bytes(serialization.Encoding.PEM)
LEAF_DER = LEAF.public_bytes(serialization.Encoding.DER)
LEAF_HASH = hashlib.sha256(LEAF_DER).hexdigest()
LEAF_ENC = envoy_url_encode(LEAF_PEM)
CHAIN_ENC = envoy_url_encode(LEAF_PEM + CA_PEM)

H1 = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
H2 = "9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e"


# --- Envoy documentation examples -----------------------------------------------------


def test_envoy_doc_example_uri_only() -> None:
    value = (
        f"By=http://frontend.lyft.com;Hash={H1};"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
        "URI=http://testclient.lyft.com"
    )
    (el,) = parse_xfcc(value)
    assert el == XfccElement(
        by=("http://frontend.lyft.com",),
        hash=H1,
        subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client",
        uris=("http://testclient.lyft.com",),
    )


def test_envoy_doc_example_two_elements() -> None:
    value = (
        f"By=http://frontend.lyft.com;Hash={H1};URI=http://testclient.lyft.com,"
        f"By=http://backend.lyft.com;Hash={H2};URI=http://frontend.lyft.com"
    )
    first, second = parse_xfcc(value)
    assert first.by == ("http://frontend.lyft.com",)
    assert first.uris == ("http://testclient.lyft.com",)
    assert second.by == ("http://backend.lyft.com",)
    assert second.hash == H2
    assert second.uris == ("http://frontend.lyft.com",)
    assert last_element(value) == second


def test_envoy_doc_example_uri_and_dns() -> None:
    value = (
        f"By=http://frontend.lyft.com;Hash={H1};"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
        "URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com"
    )
    el = last_element(value)
    assert el.dns == ("lyft.com", "www.lyft.com")
    assert el.uris == ("http://testclient.lyft.com",)
    assert el.cert_pem is None
    assert el.chain_pem == ()


# --- a real certificate, as Envoy forwards it -------------------------------------------


def test_envoy_style_cert_chain_hash() -> None:
    value = (
        f"By=spiffe://example.org/svc/envoy;Hash={LEAF_HASH};"
        f'Cert="{LEAF_ENC}";Chain="{CHAIN_ENC}";Subject="CN=planner";'
        "URI=spiffe://example.org/agent/planner"
    )
    el = last_element(value)
    assert el.hash == LEAF_HASH
    assert el.cert_pem == LEAF_PEM
    assert x509.load_pem_x509_certificate(el.cert_pem) == LEAF
    assert el.chain_pem == (LEAF_PEM, CA_PEM)
    assert [x509.load_pem_x509_certificate(p) for p in el.chain_pem] == [LEAF, CA]
    assert el.uris == ("spiffe://example.org/agent/planner",)
    assert el.by == ("spiffe://example.org/svc/envoy",)
    assert el.subject == "CN=planner"


def test_cert_unquoted_and_uppercase_hash_and_bytes() -> None:
    value = f"hash={LEAF_HASH.upper()};CERT={LEAF_ENC}"
    el = last_element(value)
    assert el.hash == LEAF_HASH  # normalised to lowercase
    assert el.cert_pem == LEAF_PEM
    assert last_element(value.encode("ascii")) == el


def test_cert_with_fully_percent_encoded_pem_and_crlf() -> None:
    pem = LEAF_PEM.replace(b"\n", b"\r\n")
    enc = "".join(f"%{b:02X}" for b in pem)
    el = last_element(f'Cert="{enc}"')
    assert x509.load_pem_x509_certificate(el.cert_pem) == LEAF  # type: ignore[arg-type]


def test_hash_must_match_cert() -> None:
    with pytest.raises(XfccError) as info:
        parse_xfcc(f'Hash={H1};Cert="{LEAF_ENC}"')
    assert info.value.rule == "hash_mismatch"


def test_cert_identity_comes_from_last_element() -> None:
    forged = f'URI=spiffe://example.org/admin;Cert="{CHAIN_ENC}"'
    # The Cert of the first element holds two certificates: the whole header fails.
    with pytest.raises(XfccError):
        last_element(forged + f',Cert="{LEAF_ENC}"')
    value = f'URI=spiffe://example.org/admin,Hash={LEAF_HASH};Cert="{LEAF_ENC}"'
    el = last_element(value)
    assert el.uris == ()
    assert el.cert_pem == LEAF_PEM


# --- quoting and escaping -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"CN=a\\"b"', 'CN=a"b'),
        ('"a,b;c=d"', "a,b;c=d"),
        ('"a\\\\b"', "a\\b"),
        ('"CN=a\\,b"', "CN=a\\,b"),  # RFC 2253 escapes survive
        ('"\\"\\""', '""'),
        ('""', ""),
        ('" leading and trailing "', " leading and trailing "),
        ('"a=b"', "a=b"),
    ],
)
def test_quoted_values(raw: str, expected: str) -> None:
    assert last_element("Subject=" + raw).subject == expected


def test_keys_case_insensitive_and_multi_valued() -> None:
    el = last_element(
        f"by=a;BY=b;hAsH={H1};uri=spiffe://x/1;Uri=spiffe://x/2;dns=a.example;DnS=b.example"
    )
    assert el.by == ("a", "b")
    assert el.hash == H1
    assert el.uris == ("spiffe://x/1", "spiffe://x/2")
    assert el.dns == ("a.example", "b.example")


def test_unknown_keys_ignored_and_empty_sans_dropped() -> None:
    el = last_element('SAN=;Foo=bar;X-New_key.1="q;v";URI=;DNS=;By=;URI=spiffe://x/y')
    assert el == XfccElement(uris=("spiffe://x/y",))


def test_equals_allowed_in_unquoted_value() -> None:
    assert last_element("URI=https://x.example/p?a=b").uris == ("https://x.example/p?a=b",)


def test_whitespace_around_element_separator() -> None:
    els = parse_xfcc("URI=a , URI=b,\tURI=c ,URI=d")
    assert [e.uris for e in els] == [("a",), ("b",), ("c",), ("d",)]


def test_limits() -> None:
    one = "URI=spiffe://x/y"
    assert len(parse_xfcc(",".join([one] * 32))) == 32
    with pytest.raises(XfccError) as info:
        parse_xfcc(",".join([one] * 33))
    assert info.value.rule == "too_many_elements"
    with pytest.raises(XfccError) as info:
        parse_xfcc(",".join([one] * 3), max_elements=2)
    assert info.value.rule == "too_many_elements"
    with pytest.raises(XfccError) as info:
        parse_xfcc(one, max_length=len(one) - 1)
    assert info.value.rule == "too_long"
    assert parse_xfcc(one, max_length=len(one))
    # Over-long input is refused before anything looks at its content.
    with pytest.raises(XfccError) as info:
        parse_xfcc("\x00" * (64 * 1024 + 1))
    assert info.value.rule == "too_long"
    with pytest.raises(XfccError) as info:
        parse_xfcc(b"\xff" * (64 * 1024 + 1))
    assert info.value.rule == "too_long"


# --- malformed input ------------------------------------------------------------------

_TWO_CERTS = envoy_url_encode(LEAF_PEM + CA_PEM)
_KEY_BLOCK = envoy_url_encode(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
_BAD_B64 = envoy_url_encode(b"-----BEGIN CERTIFICATE-----\nA=A=\n-----END CERTIFICATE-----\n")

MALFORMED = [
    ("", "empty"),
    ("URI", "missing_equals"),
    ("URI;By=x", "missing_equals"),
    ("=x", "empty_key"),
    ("URI=a;", "empty_key"),
    (";URI=a", "empty_key"),
    ("URI=a;;By=b", "empty_key"),
    ("URI=a,,URI=b", "empty_key"),
    ("URI=a,", "empty_key"),
    (",URI=a", "empty_key"),
    ("{=a", "bad_key"),
    (" URI=a", "bad_key"),
    ("U RI=a", "missing_equals"),
    ('"URI"=a', "bad_key"),
    ('Subject="abc', "unterminated_quote"),
    ('Subject="abc\\"', "unterminated_quote"),
    ('Subject="', "unterminated_quote"),
    ('Subject="abc\\', "unterminated_quote"),
    ('Subject="a"b', "unexpected_char"),
    ('Subject="a" ;URI=b', "unexpected_char"),
    ('URI=a"b"', "unexpected_char"),
    ("URI=a b", "unexpected_char"),
    ("URI=a\tb", "unexpected_char"),
    ("URI=a ", "unexpected_char"),
    ("URI=a\\b", "unexpected_char"),
    ("URI=a\nb", "bad_char"),
    ("URI=a\r\n", "bad_char"),
    ("URI=a\x00", "bad_char"),
    ("URI=\x7f", "bad_char"),
    ("URI=spiffe://é/x", "bad_char"),
    ('Subject="a\x01"', "bad_char"),
    ('Subject="caf\u00e9"', "bad_char"),
    ("Hash=abc", "bad_hash"),
    ("Hash=", "bad_hash"),
    ('Hash=""', "bad_hash"),
    ("Hash=" + "g" * 64, "bad_hash"),
    ("Hash=" + "a" * 65, "bad_hash"),
    ("Hash=" + "a" * 63, "bad_hash"),
    (f"Hash={H1};Hash={H1}", "duplicate_key"),
    (f"hash={H1};HASH={H2}", "duplicate_key"),
    (f'Cert="{LEAF_ENC}";cert="{LEAF_ENC}"', "duplicate_key"),
    (f'Chain="{LEAF_ENC}";Chain="{LEAF_ENC}"', "duplicate_key"),
    ('Subject="a";Subject="b"', "duplicate_key"),
    ("Cert=", "bad_pem"),
    ('Cert=""', "bad_pem"),
    ('Cert="abc"', "bad_pem"),
    (f'Cert="{_TWO_CERTS}"', "bad_pem"),
    (f'Cert="{_KEY_BLOCK}"', "bad_pem"),
    (f'Cert="{_BAD_B64}"', "bad_pem"),
    (f'Cert="junk{LEAF_ENC}"', "bad_pem"),
    (f'Cert="{LEAF_ENC}junk"', "bad_pem"),
    ('Cert="%zz"', "bad_percent_encoding"),
    ('Cert="abc%2"', "bad_percent_encoding"),
    (f'Cert="{LEAF_ENC}%"', "bad_percent_encoding"),
    ('Cert="%FF%FE"', "bad_pem"),
    ("Chain=", "bad_pem"),
    (f'Chain="{LEAF_ENC}{_KEY_BLOCK}"', "bad_pem"),
    ('Chain="%0A%0A"', "bad_pem"),
    ("Cert=-----BEGIN%20CERTIFICATE-----%0A-----END%20CERTIFICATE-----%0A", "bad_pem"),
]


@pytest.mark.parametrize(("value", "rule"), MALFORMED, ids=lambda v: repr(v)[:50])
def test_malformed(value: str, rule: str) -> None:
    with pytest.raises(XfccError) as info:
        parse_xfcc(value)
    assert info.value.rule == rule
    assert isinstance(info.value, ValueError)
    assert f"[{rule}]" in str(info.value)


@pytest.mark.parametrize("value", [None, 42, ["URI=a"]])
def test_non_str_rejected(value: object) -> None:
    with pytest.raises(XfccError) as info:
        parse_xfcc(value)  # type: ignore[arg-type]
    assert info.value.rule == "type"


def test_non_ascii_bytes_rejected() -> None:
    with pytest.raises(XfccError) as info:
        parse_xfcc("URI=é".encode())
    assert info.value.rule == "bad_char"


# --- fuzzing --------------------------------------------------------------------------

_TOKENS = [
    ";",
    ",",
    "=",
    '"',
    "\\",
    '\\"',
    " ",
    "\t",
    "%",
    "%0A",
    "%2",
    "%zz",
    "\n",
    "\x00",
    "é",
    "By",
    "Hash",
    "Cert",
    "Chain",
    "Subject",
    "URI",
    "DNS",
    "uri",
    "hash",
    "Foo",
    "a",
    "spiffe://example.org/x",
    H1,
    LEAF_HASH,
    LEAF_ENC,
    CHAIN_ENC,
    LEAF_ENC[:40],
    "-----BEGIN CERTIFICATE-----",
    "-----END CERTIFICATE-----",
]
grammarish = st.lists(st.sampled_from(_TOKENS), max_size=30).map("".join)


def _only_xfcc_errors(value: str) -> None:
    try:
        elements = parse_xfcc(value)
    except XfccError as e:
        assert e.rule
        return
    assert elements
    for el in elements:
        assert isinstance(el, XfccElement)
        if el.cert_pem is not None:
            assert el.cert_pem.count(b"-----BEGIN CERTIFICATE-----") == 1
        if el.hash is not None:
            assert len(el.hash) == 64


@settings(max_examples=300)
@given(st.text())
def test_fuzz_any_text_only_raises_xfcc_error(value: str) -> None:
    _only_xfcc_errors(value)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(grammarish)
def test_fuzz_grammarish_only_raises_xfcc_error(value: str) -> None:
    _only_xfcc_errors(value)


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_fuzz_bytes_only_raises_xfcc_error(value: bytes) -> None:
    with contextlib.suppress(XfccError):
        parse_xfcc(value)  # type: ignore[arg-type]


# Round trip: a small serializer written here, independent of the parser.

_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
_NONEMPTY = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30)
_HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _needs_quotes(v: str) -> bool:
    return v == "" or any(c in v for c in ',;"\\ ')


@st.composite
def elements(draw: st.DrawFn) -> tuple[XfccElement, str]:
    with_cert = draw(st.booleans())
    if with_cert:
        digest = draw(st.sampled_from([LEAF_HASH, None]))
    else:
        digest = draw(st.one_of(st.none(), _HEX64))
    el = XfccElement(
        by=tuple(draw(st.lists(_NONEMPTY, max_size=3))),
        hash=digest,
        cert_pem=LEAF_PEM if with_cert else None,
        chain_pem=(LEAF_PEM, CA_PEM) if draw(st.booleans()) else (),
        subject=draw(st.one_of(st.none(), _PRINTABLE)),
        uris=tuple(draw(st.lists(_NONEMPTY, max_size=3))),
        dns=tuple(draw(st.lists(_NONEMPTY, max_size=3))),
    )
    pairs: list[tuple[str, str]] = []
    pairs += [("By", v) for v in el.by]
    if el.hash is not None:
        pairs.append(("Hash", el.hash))
    if el.cert_pem is not None:
        pairs.append(("Cert", LEAF_ENC))
    if el.chain_pem:
        pairs.append(("Chain", CHAIN_ENC))
    if el.subject is not None:
        pairs.append(("Subject", el.subject))
    pairs += [("URI", v) for v in el.uris]
    pairs += [("DNS", v) for v in el.dns]
    pairs += [("X-Unknown", v) for v in draw(st.lists(_PRINTABLE, max_size=2))]
    if not pairs:
        pairs.append(("Foo", "bar"))
    # Shuffle, but keep the order of repeated keys' values (the parser keeps it too).
    shuffled = draw(st.permutations(pairs))
    queues: dict[str, list[str]] = {}
    for key, val in pairs:
        queues.setdefault(key, []).append(val)
    pairs = [(key, queues[key].pop(0)) for key, _ in shuffled]
    always_quote = draw(st.booleans())
    parts = []
    for key, val in pairs:
        key = draw(st.sampled_from([key, key.lower(), key.upper()]))
        text = _quote(val) if always_quote or _needs_quotes(val) else val
        parts.append(f"{key}={text}")
    return el, ";".join(parts)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(elements(), min_size=1, max_size=4))
def test_round_trip(items: list[tuple[XfccElement, str]]) -> None:
    header = ",".join(text for _, text in items)
    parsed = parse_xfcc(header)
    assert parsed == tuple(el for el, _ in items)
    assert last_element(header) == items[-1][0]
