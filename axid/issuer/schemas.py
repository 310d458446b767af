"""Request bodies of the issuer's routes, parsed strictly.

The JSON is decoded by :func:`parse_json_body` (UTF-8, an object, no duplicate
members, no NaN/Infinity) and then validated by a pydantic model in strict mode
with unknown members forbidden: ``"5"`` is not an integer, ``true`` is not 1,
``{"agent": ..., "extra": 1}`` is refused. Every failure is a
:class:`~axid.issuer.problems.Refusal` (400 ``bad_request``) whose detail names
the member and the rule, never the value sent.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from axid._json import strict_loads
from axid.issuer.problems import Refusal
from axid.issuer.registry import AUDIENCE_RE, SLUG_RE, parse_scope

__all__ = [
    "JTI_RE",
    "MAX_AUDIENCES",
    "MAX_BODY_BYTES",
    "RUN_ID_RE",
    "MintRequest",
    "RevocationRequest",
    "parse_json_body",
    "validate_body",
]

MAX_BODY_BYTES: Final = 64 * 1024
MAX_AUDIENCES: Final = 16
# Run ids are chosen by agents; random ones (UUIDs) are best, since a run id is
# global to the issuer: revocations and verifiers match runs by id alone.
RUN_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
JTI_RE: Final = re.compile(r"[A-Za-z0-9_-]{22}")
_PRINTABLE_MAX: Final = 512
_M = TypeVar("_M", bound=BaseModel)


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Decode a request body as one strict JSON object (400 ``bad_request`` otherwise)."""
    if len(body) > MAX_BODY_BYTES:
        raise Refusal(413, "bad_request", f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        obj = strict_loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refusal(400, "bad_request", "request body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise Refusal(
            400, "bad_request", "request body is not strict JSON (or repeats a member)"
        ) from None
    if not isinstance(obj, dict):
        raise Refusal(400, "bad_request", "request body must be a JSON object")
    return obj


def _loc(loc: tuple[Any, ...]) -> str:
    # Member names can be attacker-chosen (unknown members): keep them short and tame.
    parts = []
    for item in loc:
        text = re.sub(r"[^A-Za-z0-9_.\[\]-]", "?", str(item))[:40]
        parts.append(text)
    return ".".join(parts) or "body"


def validate_body(model: type[_M], obj: dict[str, Any]) -> _M:
    """Validate a decoded body against ``model`` (400 ``bad_request`` otherwise)."""
    try:
        return model.model_validate(obj, strict=True)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False, include_context=False):
            message = str(err.get("msg", "invalid"))
            if err.get("type") == "extra_forbidden":
                message = "unknown member"
            problems.append(f"{_loc(tuple(err.get('loc', ())))}: {message}")
        raise Refusal(400, "bad_request", "; ".join(problems[:8])) from None


def _check_slug(value: str, what: str) -> str:
    if SLUG_RE.fullmatch(value) is None:
        raise ValueError(f"{what} must be a slug [a-z0-9][a-z0-9-]{{0,62}}")
    return value


class MintRequest(BaseModel):
    """``POST /v1/tokens`` body."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    agent: str = Field(max_length=63)
    run: str = Field(max_length=128)
    audience: str | list[str]
    scope: str = Field(max_length=8192)
    parent_token: str | None = Field(default=None, max_length=65536)
    ttl_seconds: int | None = Field(default=None, ge=1)
    # Optional assertion: must equal the tenant the caller is registered for.
    tenant: str | None = Field(default=None, max_length=63)

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str) -> str:
        return _check_slug(value, "agent")

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str | None) -> str | None:
        return None if value is None else _check_slug(value, "tenant")

    @field_validator("run")
    @classmethod
    def _run(cls, value: str) -> str:
        if RUN_ID_RE.fullmatch(value) is None:
            raise ValueError("run must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
        return value

    @field_validator("audience")
    @classmethod
    def _audience(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or len(items) > MAX_AUDIENCES:
            raise ValueError(f"audience must name 1 to {MAX_AUDIENCES} services")
        if len(set(items)) != len(items):
            raise ValueError("audience repeats a service")
        for item in items:
            if AUDIENCE_RE.fullmatch(item) is None:
                raise ValueError("audience must be service names [A-Za-z0-9][A-Za-z0-9._:/-]*")
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        try:
            parse_scope(value)
        except ValueError:
            raise ValueError(
                "scope must be RFC 6749 scope tokens separated by single spaces, no duplicates"
            ) from None
        return value

    @property
    def audiences(self) -> tuple[str, ...]:
        return (self.audience,) if isinstance(self.audience, str) else tuple(self.audience)

    @property
    def scope_set(self) -> frozenset[str]:
        return parse_scope(self.scope)


class RevocationRequest(BaseModel):
    """``POST /v1/revocations`` body."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["jti", "run", "agent", "tenant"]
    value: str = Field(max_length=128)
    reason: str = Field(min_length=1, max_length=_PRINTABLE_MAX)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("reason must be printable text")
        return value

    def check_value(self) -> None:
        """The value's form depends on the kind (a Refusal otherwise)."""
        rule = {
            "jti": (JTI_RE, "a jti is 22 base64url characters"),
            "run": (RUN_ID_RE, "a run id matches [A-Za-z0-9][A-Za-z0-9._:-]{0,127}"),
            "agent": (SLUG_RE, "an agent is a slug [a-z0-9][a-z0-9-]{0,62}"),
            "tenant": (SLUG_RE, "a tenant is a slug [a-z0-9][a-z0-9-]{0,62}"),
        }[self.kind]
        if rule[0].fullmatch(self.value) is None:
            raise Refusal(400, "bad_request", f"value: {rule[1]}")
