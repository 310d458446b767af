"""Route rules: which requests are governed, and what a governed one must carry.

A rule matches on method and path; the FIRST matching rule decides. A request no
rule matches is still governed (identity and token are checked) and is then
denied ``scope_insufficient``: nothing is authorized by omission. Routes that
must stay open (``/healthz``, ``/metrics``) are listed with ``governed: false``.

Path globs (matched against the ASGI ``path``, the one the app routes on,
case-sensitively, with ``re.fullmatch``):

* a literal character matches itself;
* ``*`` as a whole segment matches one non-empty segment (``/payments/*``
  matches ``/payments/p1``, not ``/payments/`` nor ``/payments/p1/refund``);
  inside a segment it matches any run of non-``/`` characters (``/files/*.pdf``);
* ``**`` as a whole segment matches zero or more segments (``/admin/**``
  matches ``/admin``, ``/admin/`` and ``/admin/a/b``; ``/**`` matches every path);
* ``?``, ``[``, ``]``, ``{``, ``}``, ``\\``, ``#``, whitespace, control and
  non-ASCII characters are refused, so no glob dialect is silently misread.

Methods are uppercase HTTP method tokens; none (or ``*``) means any method. A
rule naming ``GET`` also matches ``HEAD``, because Starlette and FastAPI answer
HEAD with the GET handler: a HEAD request must not slip past a GET rule to a
weaker one below it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from mtls.spiffeid import SpiffeIdError, SpiffeIdPattern
from verifier._values import boolean, init_frozen, integer
from verifier.errors import ConfigError

__all__ = [
    "MAX_COST",
    "SCOPE_TOKEN_RE",
    "SLUG_RE",
    "RouteRule",
    "RuleSet",
    "compile_glob",
    "parse_scope",
]

SLUG_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN_RE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
_METHOD_RE: Final = re.compile(r"[A-Z]{1,20}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/*-]{0,127}")
_GLOB_CHAR_RE: Final = re.compile(r"[\x21-\x7e]*")
_GLOB_FORBIDDEN: Final = frozenset('?[]{}\\#"')
_MAX_GLOB: Final = 1024
_MAX_ITEMS: Final = 256
# The largest rule cost (e.g. cents): budget sums stay far inside a signed 64-bit column.
MAX_COST: Final = 10**12

_RULE_KEYS: Final = (
    "name",
    "methods",
    "path",
    "scope",
    "agents",
    "tenants",
    "single_use",
    "governed",
    "cost",
    "approval",
    "approvers",
)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a path glob (module docstring) to a regex for ``fullmatch``."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("must be a non-empty path glob", key="path")
    if len(pattern) > _MAX_GLOB:
        raise ConfigError(f"is longer than {_MAX_GLOB} characters", key="path")
    if not pattern.startswith("/"):
        raise ConfigError("must start with '/'", key="path")
    if _GLOB_CHAR_RE.fullmatch(pattern) is None:
        raise ConfigError("may hold only printable ASCII without spaces", key="path")
    bad = sorted(set(pattern) & _GLOB_FORBIDDEN)
    if bad:
        raise ConfigError(f"unsupported glob character(s) {''.join(bad)!r}", key="path")
    parts: list[str] = []
    for segment in pattern[1:].split("/"):
        if segment == "**":
            parts.append("(?:/[^/]*)*")
        elif "**" in segment:
            raise ConfigError("'**' must be a whole path segment", key="path")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(p) for p in segment.split("*")))
    return re.compile("".join(parts))


def parse_scope(value: object, key: str = "scope") -> frozenset[str]:
    """A scope: a space-separated string or a list of RFC 6749 scope tokens."""
    if isinstance(value, str):
        items: list[object] = value.split(" ") if value else []
    elif isinstance(value, list | tuple | frozenset | set):
        items = list(value)
    else:
        raise ConfigError("must be a space-separated string or a list of actions", key=key)
    if len(items) > _MAX_ITEMS:
        raise ConfigError(f"has more than {_MAX_ITEMS} actions", key=key)
    for item in items:
        if not isinstance(item, str) or SCOPE_TOKEN_RE.fullmatch(item) is None:
            raise ConfigError(
                "actions must be RFC 6749 scope tokens separated by single spaces", key=key
            )
    if len(set(items)) != len(items):
        raise ConfigError("repeats an action", key=key)
    return frozenset(items)  # type: ignore[arg-type]  # all str, checked above


def _slugs(value: object, key: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple | frozenset | set):
        raise ConfigError("must be a list of slugs", key=key)
    items = list(value)
    if not items:
        raise ConfigError("must not be empty (leave the key out to allow any)", key=key)
    if len(items) > _MAX_ITEMS:
        raise ConfigError(f"has more than {_MAX_ITEMS} items", key=key)
    for item in items:
        if not isinstance(item, str) or SLUG_RE.fullmatch(item) is None:
            raise ConfigError("items must be slugs [a-z0-9][a-z0-9-]{0,62}", key=key)
    if len(set(items)) != len(items):
        raise ConfigError("repeats an item", key=key)
    return frozenset(items)


def _approval(value: object) -> bool:
    """``approval: required`` (DESIGN.md "Approvals"); absent or ``none``: not required."""
    if value is None or value == "none":
        return False
    if value == "required":
        return True
    raise ConfigError("must be 'required' (or left out)", key="approval")


def _approvers(value: object) -> tuple[str, ...] | None:
    """SPIFFE ID patterns of who may approve; None: the issuer's configured approvers."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise ConfigError("must be a non-empty list of SPIFFE ID patterns", key="approvers")
    if len(value) > _MAX_ITEMS:
        raise ConfigError(f"has more than {_MAX_ITEMS} items", key="approvers")
    out = []
    for item in value:
        try:
            out.append(str(SpiffeIdPattern.parse(item)))
        except (SpiffeIdError, TypeError):
            raise ConfigError("items must be SPIFFE ID patterns", key="approvers") from None
    if len(set(out)) != len(out):
        raise ConfigError("repeats an item", key="approvers")
    return tuple(out)


def _methods(value: object) -> frozenset[str] | None:
    if value is None or value == "*":
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple | frozenset | set) or not items:
        raise ConfigError("must be a method, '*' or a non-empty list of methods", key="methods")
    out = set()
    for item in items:
        if item == "*":
            raise ConfigError("'*' must stand alone, not in a list", key="methods")
        if not isinstance(item, str) or _METHOD_RE.fullmatch(item) is None:
            raise ConfigError("methods must be uppercase HTTP method names", key="methods")
        out.add(item)
    if len(out) != len(items):
        raise ConfigError("repeats a method", key="methods")
    if "GET" in out:
        out.add("HEAD")  # Starlette answers HEAD with the GET handler
    return frozenset(out)


@dataclass(frozen=True, init=False)
class RouteRule:
    """One route rule. Construct in code or with :meth:`from_dict` (YAML).

    ``methods=None`` matches any method; ``scope`` is the set of actions the token
    must all hold; ``agents``/``tenants`` of ``None`` allow any; ``single_use``
    lets each token ``jti`` through once; ``cost`` (an integer in [0, MAX_COST],
    e.g. cents) is what a budget check (:class:`verifier.BudgetLedger`) reserves
    for an allowed request; ``approval="required"`` makes each request wait for a
    human approval of exactly that request (``approval_required`` is then the
    rule's ``True``), ``approvers`` (SPIFFE ID patterns; None: the issuer's
    configured approvers) says who may give it; ``governed=False`` passes matching
    requests to the app unchecked and unrecorded (then no other option may be set).
    The constructor parses ``methods``, ``scope``, ``agents`` and ``tenants`` (a
    string or a list) into frozensets.
    """

    path: str
    methods: frozenset[str] | None
    scope: frozenset[str]
    agents: frozenset[str] | None
    tenants: frozenset[str] | None
    single_use: bool
    governed: bool
    name: str | None
    cost: int
    approval_required: bool
    approvers: tuple[str, ...] | None
    _regex: re.Pattern[str] = field(repr=False, compare=False)

    def __init__(
        self,
        path: str,
        methods: Iterable[str] | str | None = None,
        scope: Iterable[str] | str = frozenset(),
        agents: Iterable[str] | None = None,
        tenants: Iterable[str] | None = None,
        single_use: bool = False,
        governed: bool = True,
        name: str | None = None,
        cost: int = 0,
        approval: str | None = None,
        approvers: Iterable[str] | None = None,
    ) -> None:
        init_frozen(
            self,
            _regex=compile_glob(path),
            path=path,
            methods=_methods(methods),
            scope=parse_scope(scope),
            agents=None if agents is None else _slugs(agents, "agents"),
            tenants=None if tenants is None else _slugs(tenants, "tenants"),
            single_use=boolean(single_use, "single_use"),
            governed=boolean(governed, "governed"),
            name=name,
            cost=integer(cost, "cost", lo=0, hi=MAX_COST),
            approval_required=_approval(approval),
            approvers=_approvers(list(approvers) if isinstance(approvers, tuple) else approvers),
        )

    def __post_init__(self) -> None:
        if not self.governed and (
            self.scope or self.agents is not None or self.tenants is not None
        ):
            raise ConfigError(
                "an ungoverned rule checks nothing: remove scope/agents/tenants", key="governed"
            )
        if not self.governed and self.single_use:
            raise ConfigError("an ungoverned rule cannot be single_use", key="single_use")
        if not self.governed and self.cost:
            raise ConfigError("an ungoverned rule cannot have a cost", key="cost")
        if not self.governed and self.approval_required:
            raise ConfigError("an ungoverned rule cannot require approval", key="approval")
        if self.approvers is not None and not self.approval_required:
            raise ConfigError("approvers need 'approval: required'", key="approvers")
        if self.name is not None and (
            not isinstance(self.name, str) or _NAME_RE.fullmatch(self.name) is None
        ):
            raise ConfigError("must be a short printable name", key="name")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RouteRule:
        """A rule from its YAML mapping; unknown keys are refused by name."""
        if not isinstance(doc, Mapping):
            raise ConfigError("a rule must be a mapping")
        for key in doc:
            if key not in _RULE_KEYS:
                raise ConfigError(
                    f"unknown key (allowed: {', '.join(_RULE_KEYS)})", key=str(key)[:60]
                )
        if "path" not in doc:
            raise ConfigError("is required", key="path")
        kwargs = {k: doc[k] for k in _RULE_KEYS if k in doc}
        for key in ("scope", "agents", "tenants", "methods"):
            if key in kwargs and kwargs[key] is None and key != "methods":
                raise ConfigError("must not be null (leave the key out)", key=key)
        return cls(**kwargs)

    @property
    def scope_required(self) -> str | None:
        """The required scope, space-delimited and sorted (``None`` if none)."""
        return " ".join(sorted(self.scope)) or None

    @property
    def label(self) -> str:
        """How the decision log names this rule: its name, or ``METHODS PATH``."""
        if self.name is not None:
            return self.name
        methods = self.methods
        shown = "*" if methods is None else ",".join(sorted(m for m in methods if m != "HEAD"))
        return f"{shown or 'HEAD'} {self.path}"

    def matches(self, method: str, path: str) -> bool:
        methods = self.methods
        if methods is not None and method not in methods:
            return False
        return self._regex.fullmatch(path) is not None


class RuleSet:
    """An ordered list of rules; :meth:`match` returns the first that matches."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[RouteRule] = ()) -> None:
        checked = tuple(rules)
        for index, rule in enumerate(checked):
            if not isinstance(rule, RouteRule):
                raise ConfigError("must be a RouteRule", key=f"rules[{index}]")
        self._rules = checked

    @property
    def rules(self) -> tuple[RouteRule, ...]:
        return self._rules

    @property
    def has_single_use(self) -> bool:
        return any(r.single_use for r in self._rules)

    @property
    def has_approval(self) -> bool:
        return any(r.approval_required for r in self._rules)

    def match(self, method: str, path: str) -> RouteRule | None:
        for rule in self._rules:
            if rule.matches(method, path):
                return rule
        return None

    def __len__(self) -> int:
        return len(self._rules)
