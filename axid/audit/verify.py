"""Offline verification of a decision log: every byte, link, signature and root.

:func:`verify_log` makes ONE streaming pass over a :class:`LogSource` (an export
bundle directory or the database) and checks, in order of the log:

- each entry parses strictly (canonical RFC 8785, exact field set);
- its ``seq`` field equals its position and the seq it is stored under (so a
  gap, a duplicate, a swap or an insertion shows), its ``log`` field is the
  log's name, and a stored leaf hash (database) equals the recomputed one;
- (database) the row's index columns (:data:`INDEX_COLUMNS`, the copies
  ``axid audit show`` filters on) hold exactly what the entry says;
- its ``prev`` is the leaf hash of the entry before it (the hash chain);
- every checkpoint: signed by the log key, right origin, right size, and its
  root equals the root recomputed from the entries (which also makes successive
  checkpoints consistent); no checkpoint beyond the last entry, no entry after
  the last checkpoint (an unsigned tail);
- an auditor's *trusted* checkpoint (kept from an earlier run): its size must
  not exceed the log (else the log was truncated or rolled back) and its root
  must equal the recomputed root at its size (else the log forked);
- with a witness quorum (:class:`~axid.audit.quorum.WitnessPolicy`): every
  cosignature on every checkpoint that claims a given witness key must verify
  (else the note was altered: a finding), and some checkpoint that verified
  (so one of the log's own, consistent with all the others) must carry
  cosignatures by K distinct witnesses, with at most N entries after the
  newest such one (else ``witness_failure`` says why; not tampering).

Memory is O(log n) (a compact Merkle range) plus the chunks at hand.
The report names the FIRST bad seq. A broken chain link between two entries
is attributed with one entry of look-ahead: if entry ``k`` was altered, its
hash no longer matches ``prev`` of ``k + 1`` while ``k`` itself still links to
``k - 1``; if ``k``'s own ``prev`` was altered, both of its links break.

The auditor's code, one job a module:

- here: the key (``--vkey``, or the log's own), the trusted checkpoint, the
  report, and the witness verdict;
- :mod:`axid.audit.reference`: the pass, the only code that decides a finding;
- :mod:`axid.audit.accelerate` (with :mod:`axid.audit.forkpool`): the speed.
  It says of whole chunks of entries "clean", or nothing; the reference takes
  a clean chunk only where it continues the pass, and a finding that rests
  on the accelerator's hashes makes the reference check that part again
  itself (see :mod:`axid.audit.reference`). The report is the same with or
  without it;
- :mod:`axid.audit.findings`: the findings and the report;
- :mod:`axid.audit.columns`: a database row's index columns and their check;
- :mod:`axid.audit.witnessed`: which checkpoints a witness quorum cosigned;
- :mod:`axid.audit.sources`: bundle and database sources, key arguments.

This module imports neither FastAPI nor the verifier: an auditor needs only it,
the pure modules and (for :class:`DatabaseSource`) the storage layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from axid.audit.accelerate import Accelerator
from axid.audit.columns import INDEX_COLUMNS, index_disagreements
from axid.audit.findings import (
    Finding,
    Findings,
    SourceFormatError,
    VerifyReport,
    VerifyUsageError,
)
from axid.audit.note import Checkpoint, NoteError, NoteVerifier, open_checkpoint
from axid.audit.quorum import WitnessPolicy
from axid.audit.reference import Pass
from axid.audit.sources import (
    DatabaseSource,
    ExportDirSource,
    LogSource,
    load_vkey_arg,
    load_witness_arg,
)

__all__ = [
    "INDEX_COLUMNS",
    "DatabaseSource",
    "ExportDirSource",
    "Finding",
    "LogSource",
    "SourceFormatError",
    "VerifyReport",
    "VerifyUsageError",
    "index_disagreements",
    "load_vkey_arg",
    "load_witness_arg",
    "verify_log",
]

_ORIGIN_PREFIX = "axid/"


def verify_log(
    source: LogSource,
    *,
    vkey: str | None = None,
    trusted_checkpoint: bytes | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    witnesses: WitnessPolicy | None = None,
) -> VerifyReport:
    """Verify a whole log in one streaming pass; see the module docstring.

    ``vkey`` is the auditor's trusted verifier key; without it the key stored
    with the log is used (and a warning says so: such a key is only as
    trustworthy as the log). Raises :class:`VerifyUsageError` for unreadable
    sources and bad arguments; tampering is reported, never raised.

    ``workers``: processes that check entries in parallel with this one
    (forked, Linux only). ``None``: one per usable CPU when there are several,
    once the log has shown itself long (tens of thousands of entries); ``0``:
    none. They change the speed only: findings and the report are the same.

    ``witnesses``: also require a checkpoint cosigned by a quorum of witnesses
    (the report's ``witnessed_size``, ``cosigners``, ``witness_failure``); an
    invalid cosignature by a given witness key is a finding.
    """
    if workers is not None and (type(workers) is not int or workers < 0):
        raise VerifyUsageError(f"workers must be an int >= 0, got {workers!r}")
    if witnesses is not None and not isinstance(witnesses, WitnessPolicy):
        raise VerifyUsageError("witnesses must be a WitnessPolicy")
    try:
        return _verify(source, vkey, trusted_checkpoint, progress, workers, witnesses)
    except OSError as e:
        raise VerifyUsageError(f"cannot read the log: {e}") from e


def _verify(
    source: LogSource,
    vkey: str | None,
    trusted_checkpoint: bytes | None,
    progress: Callable[[int], None] | None,
    workers: int | None,
    policy: WitnessPolicy | None,
) -> VerifyReport:
    explicit: NoteVerifier | None = None
    if vkey is not None:
        try:
            explicit = NoteVerifier.from_vkey(vkey.strip())
        except NoteError as e:
            raise VerifyUsageError(f"bad --vkey: {e}") from e
    findings = Findings()
    warnings: list[str] = []
    log_name: str | None = getattr(source, "log_name", None)

    def report(findings: Findings, key: str | None, **fields: Any) -> VerifyReport:
        fields.setdefault("witness", _witness_fields(policy, None, False))
        return _report(findings, warnings, explicit is None, key, **fields)

    verifier, key = _log_key(source, explicit, findings, warnings)
    if verifier is None:
        return report(findings, key)
    trusted: Checkpoint | None = None
    if trusted_checkpoint is not None:
        trusted = _open_trusted(trusted_checkpoint, verifier, explicit is not None, findings)
        if trusted is None:
            return report(findings, key)
    if log_name is None:
        log_name = _origin_log_name(verifier.name)

    run, ended = _audit(source, verifier, log_name, trusted, progress, workers, policy)
    witness = _witness_fields(policy, run, ended and not run.f)
    return report(
        run.f,
        key,
        entries=run.n,
        cps=run.cp_count,
        ok=not run.f and witness.get("witness_failure") is None,
        root=run.root() if ended else None,
        latest=run.latest,
        latest_note=run.latest_note,
        witness=witness,
    )


def _audit(
    source: LogSource,
    verifier: NoteVerifier,
    log_name: str | None,
    trusted: Checkpoint | None,
    progress: Callable[[int], None] | None,
    workers: int | None,
    policy: WitnessPolicy | None,
) -> tuple[Pass, bool]:
    """The reference pass over the log, with the accelerator; and, while a
    finding rests on hashes only the accelerator computed, again with the
    accelerator held back to what the last verified checkpoint covers (at
    most twice more: the last time without it). ``(pass, whether it ended)``."""
    limit: int | None = None
    while True:
        accelerator = None if limit == 0 else Accelerator(source, workers)
        run = Pass(
            source, verifier, log_name, trusted, Findings(), progress, policy, accelerator, limit
        )
        ended = run.run()
        if ended and not run.f.has_global():
            run.finish()
        if run.doubt is None:
            return run, ended
        limit = run.doubt if limit is None or run.doubt < limit else 0


def _log_key(
    source: LogSource,
    explicit: NoteVerifier | None,
    findings: Findings,
    warnings: list[str],
) -> tuple[NoteVerifier | None, str | None]:
    """The key to verify the log with, and its vkey for the report.

    ``explicit`` (the auditor's ``--vkey``) must be named after the origin
    stored with the log (a database's) and be the key stored with the log, if
    one is; without it, the stored key is used, with a warning. No key (a
    finding made): ``(None, the vkey to report)``.
    """
    origin: str | None = getattr(source, "origin", None)
    log_name: str | None = getattr(source, "log_name", None)
    stored_text: str | None = None
    stored_bad: str | None = None
    try:
        stored_text = source.vkey()
    except SourceFormatError as e:
        stored_bad = e.what
    if explicit is not None:
        if origin is not None and explicit.name != origin:
            raise VerifyUsageError(
                f"--vkey is a key for {explicit.name!r}, not for log {log_name!r} "
                f"(origin {origin!r})"
            )
        if stored_bad is not None:
            findings.add_global(f"the stored verifier key is malformed: {stored_bad}")
            return None, explicit.vkey()
        if stored_text is not None and stored_text.strip() != explicit.vkey():
            findings.add_global(
                "the verifier key stored with the log is not the trusted --vkey: the log's "
                "key was replaced"
            )
            return None, explicit.vkey()
        return explicit, explicit.vkey()
    if stored_bad is not None:
        findings.add_global(f"the stored verifier key is malformed: {stored_bad}")
        return None, None
    if stored_text is None:
        raise VerifyUsageError("no verifier key stored with the log: pass --vkey")
    try:
        verifier = NoteVerifier.from_vkey(stored_text.strip())
    except NoteError as e:
        findings.add_global(f"the stored verifier key is malformed: {e}")
        return None, None
    warnings.append(
        "no --vkey given: checked against the key stored with the log, which is only "
        "as trustworthy as the log itself; pass the log's published vkey"
    )
    if origin is not None and verifier.name != origin:
        findings.add_global(
            f"the stored verifier key is for {verifier.name!r}, not for log {log_name!r} "
            f"(origin {origin!r})"
        )
        return None, verifier.vkey()
    return verifier, verifier.vkey()


def _open_trusted(
    note: bytes, verifier: NoteVerifier, explicit: bool, findings: Findings
) -> Checkpoint | None:
    """The auditor's trusted checkpoint; None (a finding made) if the log's own key
    does not verify it (with ``--vkey``, that is a usage error)."""
    try:
        return open_checkpoint(note, [verifier], origin=verifier.name)
    except NoteError as e:
        if explicit:
            raise VerifyUsageError(
                f"the trusted checkpoint does not verify with --vkey: {e}"
            ) from e
        findings.add_global(
            "the trusted checkpoint does not verify with the key stored with the log "
            f"(the log's key may have been replaced; pass --vkey): {e}"
        )
        return None


def _report(
    findings: Findings,
    warnings: list[str],
    vkey_from_log: bool,
    key: str | None,
    *,
    entries: int = 0,
    cps: int = 0,
    ok: bool = False,
    root: bytes | None = None,
    latest: Checkpoint | None = None,
    latest_note: bytes | None = None,
    witness: Mapping[str, Any],
) -> VerifyReport:
    return VerifyReport(
        ok=ok,
        entries=entries,
        checkpoints=cps,
        first_bad=findings.first(),
        latest_checkpoint=latest,
        root=root,
        latest_note=latest_note,
        vkey=key,
        vkey_from_log=vkey_from_log,
        warnings=warnings,
        **witness,
    )


def _origin_log_name(origin: str) -> str | None:
    # Only the default origin names its log; with another, the first entry does.
    return origin[len(_ORIGIN_PREFIX) :] if origin.startswith(_ORIGIN_PREFIX) else None


def _witness_fields(policy: WitnessPolicy | None, run: Pass | None, whole: bool) -> dict[str, Any]:
    """The report's witness fields (none without a policy; see
    :meth:`~axid.audit.witnessed.WitnessTally.fields`)."""
    if policy is None:
        return {}
    if run is None or run.tally is None:
        return {"quorum": policy.quorum, "witnesses": policy.names}
    return run.tally.fields(run.n, whole)
