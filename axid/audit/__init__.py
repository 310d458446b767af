"""The signed, hash-chained, Merkle-checkpointed decision log.

The math is pure and kept apart from storage, as in transparency-dev/merkle:

- :mod:`axid.audit.merkle`  RFC 6962/9162 hashing, inclusion and consistency proofs
- :mod:`axid.audit.note`    C2SP signed notes, tlog checkpoints and vkeys (Ed25519)
- :mod:`axid.audit.entry`   the RFC 8785 canonical decision entry, and :class:`DecisionFields`,
  the one typed value a decision is inside AXID (what :meth:`DecisionLog.append` takes);
  ``_entry_format`` holds its field names, limits and timestamps, ``_entry_clean`` the
  one-regex "clean" check (:func:`~axid.audit.entry.entries_clean`)
- :mod:`axid.audit.draft`   :class:`DecisionDraft`: a request's fields as the verifier's pipeline
  and the issuer learn them, finished into one :class:`DecisionFields`
- :mod:`axid.audit.store`   SQLModel storage: :class:`LogStore` (entries, Merkle nodes, signed
  checkpoints), one concept a module: ``_store_tables`` (schema), ``_store_engine``
  (engines, SQLite settings, write locks), ``_store_append`` (sequencing, node rows,
  checkpoint signing), ``_store_head`` (the authenticated head), ``_store_nodes`` (nodes
  and proofs), ``_store_checkpoints`` (checkpoints, cosignature lines), ``_store_pages``
  (entry reads), ``_store_sqlite_file`` (a replaced SQLite file), ``_store_errors``;
  ``_logkeys`` (log key files) and ``_prooftext`` (proofs as text)
- :mod:`axid.audit.head`    the authenticated head: what the writer proves before it signs
- :mod:`axid.audit.log`     :class:`DecisionLog`, the group-commit appender services use
- :mod:`axid.audit.receipt` receipts (``AXID-Receipt``) and the caller's check of one
- :mod:`axid.audit.cosignature` C2SP witness cosignatures (keys, cosigning, checking)
- :mod:`axid.audit.witnessing` submissions to witnesses, stored cosignatures
- :mod:`axid.audit.verify`  the auditor's offline verification (database or export bundle):
  :mod:`~axid.audit.reference` decides every finding; :mod:`~axid.audit.accelerate` and
  :mod:`~axid.audit.forkpool` may only say "this range is clean"; sources, findings,
  columns, witnessed, quorum and tree hold one concept each
- :mod:`axid.audit.export`  the export bundle writer

This package imports neither ``verifier`` nor FastAPI. Its names load lazily, so that
importing a pure module (``axid.audit.note``, ``merkle``, ``cosignature``) loads
nothing else (the witness imports only those).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axid.audit.cosignature import CosignatureError, WitnessKey, WitnessSigner
    from axid.audit.draft import DecisionDraft
    from axid.audit.entry import (
        ENTRY_FIELDS,
        DecisionFields,
        EntryError,
        canonical_entry,
        parse_entry,
    )
    from axid.audit.errors import AuditError
    from axid.audit.export import ExportError, ExportResult, export_bundle
    from axid.audit.head import IntegrityFailure
    from axid.audit.log import AuditUnavailable, DecisionLog
    from axid.audit.merkle import (
        CompactRange,
        ProofError,
        consistency_proof,
        inclusion_proof,
        leaf_hash,
        node_hash,
        root_from_leaf_hashes,
        verify_consistency,
        verify_inclusion,
    )
    from axid.audit.metrics import LogCollector
    from axid.audit.note import (
        Checkpoint,
        NoteError,
        NoteSigner,
        NoteVerifier,
        open_checkpoint,
        open_note,
        sign_checkpoint,
        sign_note,
    )
    from axid.audit.receipt import Receipt, ReceiptError
    from axid.audit.store import (
        LogStore,
        StoreError,
        consistency_text,
        generate_log_key,
        load_log_key,
        make_engine,
        proof_text,
    )
    from axid.audit.verify import (
        DatabaseSource,
        ExportDirSource,
        Finding,
        VerifyReport,
        VerifyUsageError,
        verify_log,
    )

_EXPORTS: dict[str, str] = {
    "AuditError": "axid.audit.errors",
    "AuditUnavailable": "axid.audit.log",
    "Checkpoint": "axid.audit.note",
    "CompactRange": "axid.audit.merkle",
    "CosignatureError": "axid.audit.cosignature",
    "DatabaseSource": "axid.audit.verify",
    "DecisionDraft": "axid.audit.draft",
    "DecisionFields": "axid.audit.entry",
    "DecisionLog": "axid.audit.log",
    "ENTRY_FIELDS": "axid.audit._entry_format",
    "EntryError": "axid.audit._entry_format",
    "ExportDirSource": "axid.audit.verify",
    "ExportError": "axid.audit.export",
    "ExportResult": "axid.audit.export",
    "Finding": "axid.audit.verify",
    "IntegrityFailure": "axid.audit.head",
    "LogCollector": "axid.audit.metrics",
    "LogStore": "axid.audit.store",
    "NoteError": "axid.audit.note",
    "NoteSigner": "axid.audit.note",
    "NoteVerifier": "axid.audit.note",
    "ProofError": "axid.audit.merkle",
    "Receipt": "axid.audit.receipt",
    "ReceiptError": "axid.audit.receipt",
    "StoreError": "axid.audit._store_errors",
    "VerifyReport": "axid.audit.verify",
    "VerifyUsageError": "axid.audit.verify",
    "WitnessKey": "axid.audit.cosignature",
    "WitnessSigner": "axid.audit.cosignature",
    "canonical_entry": "axid.audit.entry",
    "consistency_proof": "axid.audit.merkle",
    "consistency_text": "axid.audit._prooftext",
    "export_bundle": "axid.audit.export",
    "generate_log_key": "axid.audit._logkeys",
    "inclusion_proof": "axid.audit.merkle",
    "leaf_hash": "axid.audit.merkle",
    "load_log_key": "axid.audit._logkeys",
    "make_engine": "axid.audit._store_engine",
    "node_hash": "axid.audit.merkle",
    "open_checkpoint": "axid.audit.note",
    "open_note": "axid.audit.note",
    "parse_entry": "axid.audit.entry",
    "proof_text": "axid.audit._prooftext",
    "root_from_leaf_hashes": "axid.audit.merkle",
    "sign_checkpoint": "axid.audit.note",
    "sign_note": "axid.audit.note",
    "verify_consistency": "axid.audit.merkle",
    "verify_inclusion": "axid.audit.merkle",
    "verify_log": "axid.audit.verify",
}

__all__ = [
    "ENTRY_FIELDS",
    "AuditError",
    "AuditUnavailable",
    "Checkpoint",
    "CompactRange",
    "CosignatureError",
    "DatabaseSource",
    "DecisionDraft",
    "DecisionFields",
    "DecisionLog",
    "EntryError",
    "ExportDirSource",
    "ExportError",
    "ExportResult",
    "Finding",
    "IntegrityFailure",
    "LogCollector",
    "LogStore",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "ProofError",
    "Receipt",
    "ReceiptError",
    "StoreError",
    "VerifyReport",
    "VerifyUsageError",
    "WitnessKey",
    "WitnessSigner",
    "canonical_entry",
    "consistency_proof",
    "consistency_text",
    "export_bundle",
    "generate_log_key",
    "inclusion_proof",
    "leaf_hash",
    "load_log_key",
    "make_engine",
    "node_hash",
    "open_checkpoint",
    "open_note",
    "parse_entry",
    "proof_text",
    "root_from_leaf_hashes",
    "sign_checkpoint",
    "sign_note",
    "verify_consistency",
    "verify_inclusion",
    "verify_log",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
