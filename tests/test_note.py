"""C2SP signed notes, checkpoints and vkeys: known answers, round trips, strictness."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from axid.audit.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    VerifiedNote,
    is_valid_key_name,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
)

# Known answers from golang.org/x/mod/sumdb/note (note.go package doc and
# note_test.go TestSign / TestOpen). Ed25519 is deterministic, so signing the
# text with the published test key must reproduce the published note exactly.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnW"
    "Lox33WWd1RvMc+QQ=\n"
)
GO_NOTE = (GO_TEXT + "\n" + PETER_SIG).encode()

# c2sp.org/tlog-checkpoint example (its key is not published: parse only).
C2SP_CHECKPOINT_TEXT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)
C2SP_CHECKPOINT_NOTE = (
    C2SP_CHECKPOINT_TEXT
    + "\n\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7"
    "u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
).encode()


def _go_signer() -> NoteSigner:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[4])  # base64 may hold "+"
    assert raw[0] == 0x01
    return NoteSigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(raw[1:]))


PETER = NoteVerifier.from_vkey(GO_VKEY)
ENOCH = NoteVerifier.from_vkey(ENOCH_VKEY)
SIGNER = NoteSigner("example.com/axid/test", Ed25519PrivateKey.generate())
OTHER = NoteSigner("example.com/axid/test", Ed25519PrivateKey.generate())  # same name, other key


# --------------------------------------------------------------------------- known answers


def test_go_vkey_known_answer() -> None:
    assert PETER.name == "PeterNeumann"
    assert PETER.key_id == bytes.fromhex("c74f20a3")
    assert PETER.vkey() == GO_VKEY
    assert ENOCH.key_id == bytes.fromhex("af0cfe78")


def test_go_signer_reproduces_go_note() -> None:
    signer = _go_signer()
    assert signer.key_id == bytes.fromhex("c74f20a3")
    assert signer.vkey() == GO_VKEY
    assert sign_note(GO_TEXT, signer) == GO_NOTE


def test_go_open_known_answer() -> None:
    assert open_note(GO_NOTE, [PETER]) == VerifiedNote(GO_TEXT, ("PeterNeumann",))
    two = (GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    # Enoch unknown: ignored. Both known: both verified, in line order.
    assert open_note(two, [PETER]).verified_by == ("PeterNeumann",)
    assert open_note(two, [ENOCH, PETER]).verified_by == ("PeterNeumann", "EnochRoot")
    assert open_note(two, [ENOCH]).verified_by == ("EnochRoot",)
    with pytest.raises(NoteError, match="no known signature"):
        open_note(two, [])


def test_go_vkey_manglings_rejected() -> None:
    # As note_test.go TestNewVerifier: every proper substring and every
    # single-byte increment of the vkey must be rejected.
    b = GO_VKEY.encode()
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    NoteVerifier.from_vkey(b[i:j].decode())
    for i in range(len(b)):
        mangled = bytearray(b)
        mangled[i] += 1
        with pytest.raises(NoteError):
            NoteVerifier.from_vkey(mangled.decode())
    # Go's wrong-length key (with adjusted key id): its base64 is also
    # non-canonical, which we reject first.
    with pytest.raises(NoteError):
        NoteVerifier.from_vkey(
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
        )
    # Go's unknown algorithm (0x65) with adjusted key id.
    with pytest.raises(NoteError, match="algorithm"):
        NoteVerifier.from_vkey("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
    # Wrong key length in canonical base64, with a matching key id.
    raw = base64.b64decode(GO_VKEY.split("+", 2)[2]) + b"\x00"
    kid = hashlib.sha256(b"PeterNeumann\n" + raw).hexdigest()[:8]
    with pytest.raises(NoteError, match="32 bytes"):
        NoteVerifier.from_vkey(f"PeterNeumann+{kid}+{base64.b64encode(raw).decode()}")


@pytest.mark.parametrize(
    "vkey",
    [
        GO_VKEY.upper(),
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # upper-case id
        GO_VKEY + "\n",
        " " + GO_VKEY,
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3",
        "PeterNeumann+c74f20a3+",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "",
    ],
)
def test_bad_vkeys(vkey: str) -> None:
    with pytest.raises(NoteError):
        NoteVerifier.from_vkey(vkey)


# --------------------------------------------------------------------------- round trips


def test_sign_open_round_trip() -> None:
    text = "hello\n\nworld, with a blank line inside\n"
    note = sign_note(text, SIGNER)
    assert note.startswith(text.encode() + b"\n\xe2\x80\x94 example.com/axid/test ")
    assert open_note(note, [SIGNER.verifier()]) == VerifiedNote(text, (SIGNER.name,))


def test_vkey_round_trip() -> None:
    v = NoteVerifier.from_vkey(SIGNER.vkey())
    assert v == SIGNER.verifier() or v.vkey() == SIGNER.vkey()
    assert v.key_id == SIGNER.key_id
    assert len(v.key_id) == 4
    # Same name, other key: other id, so its signatures are "unknown", not invalid.
    assert OTHER.key_id != SIGNER.key_id


def test_unknown_key_with_same_name_is_ignored() -> None:
    text = "text\n"
    both = sign_note(text, SIGNER) + sign_note(text, OTHER).split(b"\n\n", 1)[1]
    assert open_note(both, [SIGNER.verifier()]).verified_by == (SIGNER.name,)
    with pytest.raises(NoteError, match="no known signature"):
        open_note(sign_note(text, OTHER), [SIGNER.verifier()])


def test_checkpoint_round_trip() -> None:
    cp = Checkpoint("example.com/axid/payments", 42, bytes(range(32)))
    text = cp.to_text()
    assert text == "example.com/axid/payments\n42\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    assert Checkpoint.parse(text) == cp
    note = sign_checkpoint(cp, SIGNER)
    assert open_checkpoint(note, [SIGNER.verifier()]) == cp
    assert open_checkpoint(note, [SIGNER.verifier()], origin=cp.origin) == cp
    with pytest.raises(NoteError, match="origin"):
        open_checkpoint(note, [SIGNER.verifier()], origin="example.com/other")
    ext = Checkpoint("o", 0, bytes(32), ("ext one", "ext-two"))
    assert Checkpoint.parse(ext.to_text()) == ext


def test_c2sp_checkpoint_example() -> None:
    cp = Checkpoint.parse(C2SP_CHECKPOINT_TEXT)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.to_text() == C2SP_CHECKPOINT_TEXT
    # Signed by a key we do not know: the note must not be accepted.
    with pytest.raises(NoteError, match="no known signature"):
        open_checkpoint(C2SP_CHECKPOINT_NOTE, [SIGNER.verifier()])


# --------------------------------------------------------------------------- strictness

_B64 = PETER_SIG.split(" ")[2].rstrip("\n")


def _tamper_kid() -> str:
    raw = bytearray(base64.b64decode(_B64))
    raw[0] ^= 1
    return f"\u2014 PeterNeumann {base64.b64encode(bytes(raw)).decode()}\n"


def _bad_sig_known_key() -> str:
    raw = bytearray(base64.b64decode(_B64))
    raw[10] ^= 1
    return f"\u2014 PeterNeumann {base64.b64encode(bytes(raw)).decode()}\n"


def _short_sig_known_key() -> str:
    raw = base64.b64decode(_B64)[:-1]
    return f"\u2014 PeterNeumann {base64.b64encode(raw).decode()}\n"


def _noncanonical_b64() -> str:
    # "...AM=" -> "...AN=": same bytes for a lax decoder (padding bits set).
    return PETER_SIG.replace("JnAM=", "JnAN=")


BAD_NOTES: list[tuple[str, bytes, str | None]] = [
    ("missing blank line", (GO_TEXT + PETER_SIG).encode(), "blank line"),
    ("text only", GO_TEXT.encode(), "blank line"),
    ("no signature lines", (GO_TEXT + "\n").encode(), "no signature"),
    (
        "hyphen instead of em dash",
        (GO_TEXT + "\n" + PETER_SIG.replace("\u2014", "-")).encode(),
        None,
    ),
    (
        "en dash instead of em dash",
        (GO_TEXT + "\n" + PETER_SIG.replace("\u2014", "\u2013")).encode(),
        "em dash",
    ),
    (
        "em dash without space",
        (GO_TEXT + "\n" + PETER_SIG.replace("\u2014 ", "\u2014")).encode(),
        "em dash",
    ),
    (
        "two spaces after name",
        (GO_TEXT + "\n" + PETER_SIG.replace("n x08", "n  x08")).encode(),
        None,
    ),
    ("bad base64", (GO_TEXT + "\n" + PETER_SIG.replace("x08go", "x08g!")).encode(), "base64"),
    ("non-canonical base64", (GO_TEXT + "\n" + _noncanonical_b64()).encode(), "base64"),
    (
        "base64 without padding",
        (GO_TEXT + "\n" + PETER_SIG.replace("AM=", "AM")).encode(),
        "base64",
    ),
    ("wrong key id", (GO_TEXT + "\n" + _tamper_kid()).encode(), "no known signature"),
    (
        "tampered text",
        (GO_TEXT.replace("cryptography", "cryptographY") + "\n" + PETER_SIG).encode(),
        "invalid signature",
    ),
    (
        "bad signature by a known key",
        (GO_TEXT + "\n" + _bad_sig_known_key()).encode(),
        "invalid signature",
    ),
    (
        "short signature by a known key",
        (GO_TEXT + "\n" + _short_sig_known_key()).encode(),
        "invalid signature",
    ),
    (
        "good and bad signatures by one key",
        (GO_TEXT + "\n" + PETER_SIG + _bad_sig_known_key()).encode(),
        "repeated",
    ),
    ("unknown-key-only", (GO_TEXT + "\n" + ENOCH_SIG).encode(), "no known signature"),
    ("duplicated signature line", (GO_TEXT + "\n" + PETER_SIG + PETER_SIG).encode(), "repeated"),
    (
        "duplicated unknown line",
        (GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG + ENOCH_SIG).encode(),
        "repeated",
    ),
    ("CRLF line endings", (GO_TEXT + "\n" + PETER_SIG).replace("\n", "\r\n").encode(), "control"),
    ("CR in text", (GO_TEXT.replace(",\n", ",\r\n") + "\n" + PETER_SIG).encode(), "control"),
    ("tab in text", ("\t" + GO_TEXT + "\n" + PETER_SIG).encode(), "control"),
    ("NUL", (GO_TEXT + "\n" + PETER_SIG).encode() + b"\x00", "control"),
    ("trailing data without newline", GO_NOTE + b"junk", None),
    ("trailing line", GO_NOTE + b"Unexpected line.\n", "em dash"),
    ("trailing blank line", GO_NOTE + b"\n", None),
    ("signature without final newline", GO_NOTE[:-1], "newline"),
    ("name with space", (GO_TEXT + "\n" + "\u2014 Bad Name " + _B64 + "\n").encode(), None),
    ("name with plus", (GO_TEXT + "\n" + "\u2014 Bad+Name " + _B64 + "\n").encode(), "key name"),
    ("empty name", (GO_TEXT + "\n" + "\u2014  " + _B64 + "\n").encode(), "key name"),
    ("too-short signature", (GO_TEXT + "\n\u2014 PeterNeumann AAAA\n").encode(), "too short"),
    ("invalid UTF-8", b"\xff" + GO_NOTE, "UTF-8"),
    (
        "too many signatures",
        (GO_TEXT + "\n").encode() + b"".join(f"\u2014 k{i} {_B64}\n".encode() for i in range(101)),
        "more than 100",
    ),
    ("too large", b"a" * MAX_NOTE_SIZE + b"\n\n" + PETER_SIG.encode(), "larger"),
]


@pytest.mark.parametrize(("desc", "note", "match"), BAD_NOTES, ids=[b[0] for b in BAD_NOTES])
def test_open_note_rejects(desc: str, note: bytes, match: str | None) -> None:
    with pytest.raises(NoteError, match=match):
        open_note(note, [PETER])


def test_known_key_failure_rejects_whole_note() -> None:
    # One known key verifies, another known key's signature fails: reject
    # (C2SP: SHOULD reject the whole note), never "at least one verified".
    raw = bytearray(base64.b64decode(ENOCH_SIG.split(" ")[2]))
    raw[20] ^= 1
    bad_enoch = f"\u2014 EnochRoot {base64.b64encode(bytes(raw)).decode()}\n"
    note = (GO_TEXT + "\n" + PETER_SIG + bad_enoch).encode()
    assert open_note(note, [PETER]).verified_by == ("PeterNeumann",)  # Enoch unknown: ignored
    with pytest.raises(NoteError, match="invalid signature for key EnochRoot"):
        open_note(note, [PETER, ENOCH])


def test_open_note_accepts_many_signatures() -> None:
    # C2SP: verifiers MUST accept at least 16 signatures.
    lines = "".join(f"\u2014 k{i} {_B64}\n" for i in range(99))
    assert open_note((GO_TEXT + "\n" + lines + PETER_SIG).encode(), [PETER]).verified_by == (
        "PeterNeumann",
    )


def test_ambiguous_verifiers_rejected() -> None:
    # Two different keys under one name and key id cannot be constructed
    # honestly (the id is derived), so equal verifiers are merely de-duplicated.
    assert open_note(GO_NOTE, [PETER, PETER]).verified_by == ("PeterNeumann",)
    with pytest.raises(NoteError):
        NoteVerifier("PeterNeumann", bytes.fromhex("c74f20a3"), ENOCH.public_key)


def test_sign_note_rejects_bad_text() -> None:
    for text in ["no newline", "a\rb\n", "\x00\n", "x\ud800\n"]:
        with pytest.raises(NoteError):
            sign_note(text, SIGNER)
    with pytest.raises(NoteError):
        sign_note("a" * MAX_NOTE_SIZE + "\n", SIGNER)


@pytest.mark.parametrize(
    "name", ["", "a b", "a+b", "a\u00a0b", "a\u2028b", "tab\tname", "x\ud800", "nl\n"]
)
def test_invalid_key_names(name: str) -> None:
    assert not is_valid_key_name(name)
    with pytest.raises(NoteError):
        NoteSigner(name, Ed25519PrivateKey.generate())


_ROOT = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
BAD_CHECKPOINTS: list[tuple[str, str]] = [
    ("no final newline", f"o\n1\n{_ROOT}"),
    ("two lines", "o\n1\n"),
    ("empty", ""),
    ("only newline", "\n"),
    ("empty origin", f"\n1\n{_ROOT}\n"),
    ("origin leading space", f" o\n1\n{_ROOT}\n"),
    ("origin trailing space", f"o \n1\n{_ROOT}\n"),
    ("origin with CR", f"o\r\n1\n{_ROOT}\n"),
    ("leading zero", f"o\n01\n{_ROOT}\n"),
    ("double zero", f"o\n00\n{_ROOT}\n"),
    ("plus sign", f"o\n+1\n{_ROOT}\n"),
    ("minus sign", f"o\n-1\n{_ROOT}\n"),
    ("space in size", f"o\n 1\n{_ROOT}\n"),
    ("underscore in size", f"o\n1_000\n{_ROOT}\n"),
    ("arabic-indic digit", f"o\n\u0661\n{_ROOT}\n"),
    ("hex size", f"o\n0x1\n{_ROOT}\n"),
    ("empty size", f"o\n\n{_ROOT}\n"),
    ("size over uint64", f"o\n{2**64}\n{_ROOT}\n"),
    ("root bad base64", "o\n1\n!!!!\n"),
    ("root 31 bytes", f"o\n1\n{base64.b64encode(bytes(31)).decode()}\n"),
    ("root 33 bytes", f"o\n1\n{base64.b64encode(bytes(33)).decode()}\n"),
    ("root non-canonical", f"o\n1\n{_ROOT[:-2]}9=\n"),
    ("root unpadded", f"o\n1\n{_ROOT[:-1]}\n"),
    ("root urlsafe", f"o\n1\n{base64.urlsafe_b64encode(bytes([251] * 32)).decode()}\n"),
    ("root trailing space", f"o\n1\n{_ROOT} \n"),
    ("empty extension line", f"o\n1\n{_ROOT}\n\n"),
    ("empty line between extensions", f"o\n1\n{_ROOT}\na\n\nb\n"),
    ("CRLF", f"o\r\n1\r\n{_ROOT}\r\n"),
]


@pytest.mark.parametrize(("desc", "text"), BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_checkpoint_parse_rejects(desc: str, text: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_checkpoint_constructor_checks() -> None:
    for args in [
        ("", 1, bytes(32)),
        ("o", -1, bytes(32)),
        ("o", 2**64, bytes(32)),
        ("o", True, bytes(32)),
        ("o", 1, bytes(31)),
        ("o\nx", 1, bytes(32)),
    ]:
        with pytest.raises(NoteError):
            Checkpoint(*args)  # type: ignore[arg-type]
    with pytest.raises(NoteError):
        Checkpoint("o", 1, bytes(32), ("",))
    with pytest.raises(NoteError):
        Checkpoint("o", 1, bytes(32), ("a\nb",))
    assert Checkpoint("o", 2**64 - 1, bytes(32)).size == 2**64 - 1


def test_open_checkpoint_requires_checkpoint_text() -> None:
    note = sign_note("just a note\n", SIGNER)
    with pytest.raises(NoteError):
        open_checkpoint(note, [SIGNER.verifier()])


# --------------------------------------------------------------------------- hypothesis

_CP_NOTE = sign_checkpoint(Checkpoint("example.com/axid/h", 7, bytes(range(32))), SIGNER)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_open_note_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(NoteError):
        open_note(data, [PETER, SIGNER.verifier()])


_piece = st.sampled_from(
    [
        "\n",
        "\n\n",
        "\u2014 ",
        "\u2014",
        " ",
        "+",
        "=",
        "PeterNeumann",
        _B64,
        "AAAA",
        "a",
        "\r",
        "0",
        "01",
        _ROOT,
        "example.com/axid/h",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_piece, st.text(max_size=8)), max_size=20))
def test_open_note_structured_garbage(pieces: list[str]) -> None:
    data = "".join(pieces).encode("utf-8", "surrogatepass")
    with contextlib.suppress(NoteError):
        open_note(data, [PETER, SIGNER.verifier()])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_CP_NOTE) - 1), st.integers(1, 255))
def test_checkpoint_note_single_byte_change_rejected(pos: int, delta: int) -> None:
    data = bytearray(_CP_NOTE)
    data[pos] = (data[pos] + delta) % 256
    with pytest.raises(NoteError):
        open_checkpoint(bytes(data), [SIGNER.verifier()])


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.one_of(_piece, st.text(max_size=6)), max_size=12).map("".join),
    )
)
def test_checkpoint_parse_arbitrary_text(text: str) -> None:
    try:
        cp = Checkpoint.parse(text)
    except NoteError:
        return
    assert cp.to_text() == text  # anything accepted is canonical


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_from_vkey_arbitrary_text(vkey: str) -> None:
    with contextlib.suppress(NoteError):
        NoteVerifier.from_vkey(vkey)
