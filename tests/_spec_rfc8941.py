"""An RFC 8941 Dictionary parser, written from the RFC text only, as far as AXID-Receipt needs.

A test oracle, independent of ``http_sfv`` and of the project. It follows the
parsing algorithms of RFC 8941 section 4.2 step by step:

- 4.2    Parsing Structured Fields (field type "dictionary")
- 4.2.2  Parsing a Dictionary
- 4.2.3  Parsing an Item, 4.2.3.1 a Bare Item, 4.2.3.2 Parameters, 4.2.3.3 a Key
- 4.2.4  Parsing an Integer or Decimal (integers only, see below)
- 4.2.7  Parsing a Byte Sequence

What the receipt header never holds is refused with :class:`Unsupported`
(a subclass of :class:`ParseError`): Inner Lists, Decimals, Strings, Tokens,
Booleans, members without a value, and Parameters, which the receipt
forbids (its members are bare items). Unsupported means "this oracle does
not decide": the input may or may not be valid RFC 8941. A member without a
value is recorded and parsing goes on, so that an input the RFC fails
elsewhere still fails with a plain :class:`ParseError`.

Base64 in Byte Sequences: the RFC says parsers SHOULD NOT fail when "="
padding is missing or pad bits are non-zero; this parser follows that
(``synthesizing padding``), and fails only where base64 decoding fails.
"""

from __future__ import annotations

import base64
import binascii
import string

DIGIT = frozenset(string.digits)
LCALPHA = frozenset(string.ascii_lowercase)
ALPHA = frozenset(string.ascii_letters)
KEY_CHARS = LCALPHA | DIGIT | frozenset("_-.*")
B64_CHARS = ALPHA | DIGIT | frozenset("+/=")
OWS = " \t"


class ParseError(ValueError):
    """RFC 8941: "fail parsing"."""


class Unsupported(ParseError):
    """Valid RFC 8941 this oracle does not parse (no AXID-Receipt member is one)."""


class _Input:
    """input_string, consumed from the front."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0

    def empty(self) -> bool:
        return self.i >= len(self.s)

    def first(self) -> str:
        return "" if self.empty() else self.s[self.i]

    def consume(self) -> str:
        c = self.s[self.i]
        self.i += 1
        return c

    def discard(self, chars: str) -> None:
        while not self.empty() and self.first() in chars:
            self.i += 1


def parse_dictionary(input_bytes: bytes) -> dict[str, int | bytes]:
    """4.2 with field_type "dictionary": an ordered map of member name to bare item."""
    # 1. Convert input_bytes into an ASCII string input_string; if conversion fails, fail.
    try:
        inp = _Input(input_bytes.decode("ascii"))
    except UnicodeDecodeError:
        raise ParseError("not ASCII") from None
    # 2. Discard any leading SP characters from input_string.
    inp.discard(" ")
    # 3. (dictionary) output = Parsing a Dictionary.
    output = _dictionary(inp)
    # 4. Discard any leading SP characters from input_string.
    inp.discard(" ")
    # 5. If input_string is not empty, fail parsing.
    if not inp.empty():
        raise ParseError("trailing characters")
    # 6. Otherwise, return output.
    return output


def _dictionary(inp: _Input) -> dict[str, int | bytes]:
    """4.2.2."""
    # 1. Let dictionary be an empty, ordered map.
    dictionary: dict[str, int | bytes] = {}
    valueless: list[str] = []
    # 2. While input_string is not empty:
    while not inp.empty():
        # 1. Let this_key be the result of Parsing a Key.
        this_key = _key(inp)
        # 2. If the next character is "=": consume it; member = Item or Inner List.
        if inp.first() == "=":
            inp.consume()
            member = _item_or_inner_list(inp)
        # 3. Otherwise: value Boolean true, with parameters.
        else:
            if _has_parameters(inp):
                raise Unsupported("Parameters")
            valueless.append(this_key)
            member = 1  # stands for Boolean true: the member is Unsupported below
        # 4./5. Overwrite an existing key's value, else append (a dict does both).
        dictionary[this_key] = member
        # 6. Discard any leading OWS characters from input_string.
        inp.discard(OWS)
        # 7. If input_string is empty, return dictionary.
        if inp.empty():
            if valueless:
                raise Unsupported(f"members without a value (Boolean true): {valueless}")
            return dictionary
        # 8. Consume the first character of input_string; if it is not ",", fail parsing.
        if inp.consume() != ",":
            raise ParseError("members must be separated by ','")
        # 9. Discard any leading OWS characters from input_string.
        inp.discard(OWS)
        # 10. If input_string is empty, there is a trailing comma; fail parsing.
        if inp.empty():
            raise ParseError("trailing comma")
    # 3. No structured data has been found; return dictionary (which is empty).
    return dictionary


def _item_or_inner_list(inp: _Input) -> int | bytes:
    """4.2.1.1: an Inner List if the first character is "(", else an Item (4.2.3)."""
    if inp.first() == "(":
        raise Unsupported("Inner List")
    # 4.2.3: 1. bare_item = Parsing a Bare Item; 2. parameters = Parsing Parameters.
    bare_item = _bare_item(inp)
    if _has_parameters(inp):
        raise Unsupported("Parameters (an AXID-Receipt member has none)")
    return bare_item


def _bare_item(inp: _Input) -> int | bytes:
    """4.2.3.1."""
    c = inp.first()
    # 1. "-" or a DIGIT: Integer or Decimal.
    if c == "-" or c in DIGIT:
        return _integer(inp)
    # 2. DQUOTE: String; 3. "*" or ALPHA: Token; 5. "?": Boolean.
    if c == '"' or c == "*" or c in ALPHA or c == "?":
        raise Unsupported(f"bare item starting with {c!r}")
    # 4. ":": Byte Sequence.
    if c == ":":
        return _byte_sequence(inp)
    # 6. Otherwise, the item type is unrecognized; fail parsing.
    raise ParseError(f"unrecognized item type {c!r}")


def _has_parameters(inp: _Input) -> bool:
    """4.2.3.2 step 2.1: parameters start with ";" (their parse is not needed to refuse them)."""
    return inp.first() == ";"


def _key(inp: _Input) -> str:
    """4.2.3.3."""
    # 1. If the first character of input_string is not lcalpha or "*", fail parsing.
    if not (inp.first() in LCALPHA or inp.first() == "*") or inp.empty():
        raise ParseError("a key starts with a lowercase letter or '*'")
    # 2. Let output_string be an empty string.
    output_string = ""
    # 3. While input_string is not empty:
    while not inp.empty():
        # 1. If the first character is not lcalpha, DIGIT, "_", "-", ".", "*", return.
        if inp.first() not in KEY_CHARS:
            return output_string
        # 2./3. Consume it and append it to output_string.
        output_string += inp.consume()
    # 4. Return output_string.
    return output_string


def _integer(inp: _Input) -> int:
    """4.2.4, as far as integers go (a "." makes it a Decimal: Unsupported)."""
    # 1.-3. type "integer", sign 1, input_number "".
    sign, input_number = 1, ""
    # 4. If the first character is "-", consume it and set sign to -1.
    if inp.first() == "-":
        inp.consume()
        sign = -1
    # 5. If input_string is empty, there is an empty integer; fail parsing.
    if inp.empty():
        raise ParseError("empty integer")
    # 6. If the first character of input_string is not a DIGIT, fail parsing.
    if inp.first() not in DIGIT:
        raise ParseError("an integer starts with a digit")
    # 7. While input_string is not empty:
    while not inp.empty():
        # 1.-2. A DIGIT is consumed and appended.
        if inp.first() in DIGIT:
            input_number += inp.consume()
        # 3. Else, if type is "integer" and char is ".": a Decimal.
        elif inp.first() == ".":
            raise Unsupported("Decimal")
        # 4. Otherwise, leave the char in input_string, and exit the loop.
        else:
            break
        # 5. If type is "integer" and input_number has more than 15 characters, fail parsing.
        if len(input_number) > 15:
            raise ParseError("integer longer than 15 digits")
    # 8. Parse input_number as an integer; output_number is it times sign.
    return sign * int(input_number)


def _byte_sequence(inp: _Input) -> bytes:
    """4.2.7."""
    # 1. If the first character of input_string is not ":", fail parsing.
    # 2. Discard the first character of input_string.
    if inp.consume() != ":":
        raise ParseError("a byte sequence starts with ':'")
    # 3. If there is not a ":" character before the end of input_string, fail parsing.
    end = inp.s.find(":", inp.i)
    if end < 0:
        raise ParseError("unterminated byte sequence")
    # 4. b64_content: up to but not including the first ":". 5. Consume the ":".
    b64_content = inp.s[inp.i : end]
    inp.i = end + 1
    # 6. If b64_content contains a character not in ALPHA, DIGIT, "+", "/", "=", fail.
    if any(c not in B64_CHARS for c in b64_content):
        raise ParseError("byte sequence holds a character outside base64")
    # 7. base64-decode it (RFC 4648), synthesizing padding if necessary; failure fails.
    padded = b64_content + "=" * (-len(b64_content) % 4)
    try:
        return binascii.a2b_base64(padded.encode("ascii"), strict_mode=True)
    except binascii.Error:
        raise ParseError("byte sequence is not base64") from None


def serialize_dictionary(members: dict[str, int | bytes]) -> str:
    """4.1.2 Serializing a Dictionary (of integers and byte sequences, no parameters)."""
    out = []
    for name, value in members.items():
        if isinstance(value, bytes):
            out.append(f"{name}=:{base64.b64encode(value).decode('ascii')}:")  # 4.1.8
        else:
            out.append(f"{name}={value}")  # 4.1.4
    return ", ".join(out)
