"""DESIGN.md layout: `axid.witness` imports only axid.audit's pure modules (note,
merkle, cosignature) and its own modules."""

from __future__ import annotations

import ast
from pathlib import Path

import axid.witness

ALLOWED = {"axid.audit.note", "axid.audit.merkle", "axid.audit.cosignature"}


def test_witness_imports_only_pure_audit_modules() -> None:
    package = Path(axid.witness.__file__).parent
    seen: set[str] = set()
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("verifier", "mtls", "fastapi")), (path.name, name)
                if name.startswith("axid") and not name.startswith("axid.witness"):
                    assert name in ALLOWED, (path.name, name)
                    seen.add(name)
    assert seen == ALLOWED
