"""What ``axid demo`` writes, and where: the demo directory and everything in it
before a server starts.

In the demo directory (a new temporary one, or ``--dir DIR``, which must be empty
or absent):

* ``certs/``: a dev PKI (``axid certs init``): the CA, ``bundle.pem`` and SVIDs for
  ``issuer``, ``payments``, ``planner`` and ``worker``, plus ``admin``
  (``spiffe://TD/ops/admin``, the only identity that may revoke) and ``worker-2``
  (a second certificate and key for the worker's very SPIFFE ID: another instance
  of the same workload);
* ``registrations.yaml``: planner may mint ``payments:read payments:refund
  payments:delete``, worker ``payments:read payments:refund``, both for tenant
  ``acme`` and audience ``payments``;
* ``keys/``: the issuer's token keyring and the two decision-log keys (0600), the
  logs' vkeys ``issuer.vkey`` and ``payments.vkey`` and the witness's ``witness.vkey``
  (what an auditor is given);
* ``witness/``: the witness's own files: ``keys/`` (``witness.key`` and
  ``witness.vkey``, as ``axid witness init --name witness.TD/demo`` writes them),
  ``witness.yaml`` (both logs' origins and vkeys) and its state database
  ``witness.db``;
* ``axid.db``: one SQLite database for the issuer's runs and revocations, the
  decision logs ``issuer`` and ``payments`` (with the witness's cosignatures) and
  the single-use store;
* ``refund.receipt``: the ``AXID-Receipt`` of the allowed refund, as its caller keeps
  it (written by :mod:`axid.demo.audit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from axid.audit.note import NoteSigner
from axid.audit.store import LogKeyError, generate_log_key, origin_for
from axid.demo.payments import PAYMENTS_AUDIENCE, PAYMENTS_SERVICE, PAYMENTS_TENANT
from axid.witness import WitnessKeyError, init_keys
from mtls.devpki import DevPki, DevPkiError, init_dev_pki
from mtls.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

__all__ = [
    "ADMIN_PATH",
    "DEMO_HOST",
    "ISSUER_LOG",
    "PLANNER_SCOPE",
    "WITNESS_QUORUM",
    "WORKER2_NAME",
    "WORKER_SCOPE",
    "DemoError",
    "DemoLayout",
    "DemoUsageError",
    "Provisioned",
    "parse_trust_domain",
    "prepare_directory",
    "provision",
]

DEMO_HOST: Final = "127.0.0.1"
ISSUER_LOG: Final = "issuer"
ADMIN_PATH: Final = "/ops/admin"
WORKER2_NAME: Final = "worker-2"
PLANNER_SCOPE: Final = "payments:read payments:refund payments:delete"
WORKER_SCOPE: Final = "payments:read payments:refund"
# The logs' witness quorum (log.quorum, and what the auditor requires).
WITNESS_QUORUM: Final = 1


class DemoError(Exception):
    """The demo could not be set up or run (a server did not start, ...)."""


class DemoUsageError(DemoError):
    """Bad arguments: a non-empty ``--dir``, an invalid trust domain."""


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo's files go, under one root directory."""

    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def registrations(self) -> Path:
        return self.root / "registrations.yaml"

    @property
    def database(self) -> Path:
        return self.root / "axid.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.database}"

    def log_key(self, log: str) -> Path:
        return self.keys / f"{log}-log.pem"

    def vkey_file(self, log: str) -> Path:
        return self.keys / f"{log}.vkey"

    @property
    def receipt_file(self) -> Path:
        return self.root / "refund.receipt"

    @property
    def witness_dir(self) -> Path:
        """The witness's own directory: ``keys/`` (``axid witness init``), ``witness.yaml``
        and its state database ``witness.db``."""
        return self.root / "witness"

    @property
    def witness_config(self) -> Path:
        return self.witness_dir / "witness.yaml"

    @property
    def witness_vkey_file(self) -> Path:
        """The witness's vkey as published to the logs' auditors, beside the logs' vkeys."""
        return self.keys / "witness.vkey"


def prepare_directory(directory: Path) -> DemoLayout:
    """Use ``directory`` for a new demo: created if absent; refused if it holds anything
    (the demo never mixes its PKI, keys or logs with files already there)."""
    d = Path(directory).expanduser()
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise DemoUsageError(f"{d} is not a directory (or is a symbolic link)")
    if d.exists():
        try:
            not_empty = any(d.iterdir())
        except OSError as exc:
            raise DemoUsageError(f"cannot read {d}: {exc.strerror or exc}") from None
        if not_empty:
            raise DemoUsageError(
                f"{d} is not empty: give a new or empty directory (the demo writes "
                "certs/, keys/, witness/, registrations.yaml, axid.db and refund.receipt "
                "into it)"
            )
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DemoUsageError(f"cannot create {d}: {exc.strerror or exc}") from None
    return DemoLayout(d.resolve())


def parse_trust_domain(trust_domain: str) -> TrustDomain:
    """``--trust-domain``, or :class:`DemoUsageError`."""
    try:
        return TrustDomain.parse(trust_domain)
    except SpiffeIdError as exc:
        raise DemoUsageError(f"invalid trust domain {trust_domain!r}: {exc}") from None


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` wrote: the dev PKI and the decision logs' verifier keys."""

    layout: DemoLayout
    pki: DevPki
    vkeys: dict[str, str]
    witness_vkey: str = ""

    @property
    def trust_domain(self) -> str:
        return self.pki.trust_domain.name

    def cert(self, name: str) -> Path:
        return self.layout.certs / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.layout.certs / f"{name}.key"

    def spiffe_id(self, name: str) -> SpiffeId:
        if name == "admin":
            return SpiffeId(self.pki.trust_domain, ADMIN_PATH)
        return self.pki.spiffe_id("worker" if name == WORKER2_NAME else name)


def _registrations(td: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        {
            "spiffe_id": f"spiffe://{td}/agent/{agent}",
            "tenant": PAYMENTS_TENANT,
            "agents": [agent],
            "audiences": [PAYMENTS_AUDIENCE],
            "scope": scope,
        }
        for agent, scope in (("planner", PLANNER_SCOPE), ("worker", WORKER_SCOPE))
    ]
    # Explicit delegation: the worker's runs may be children of the planner's only.
    entries[1]["spawn_from"] = [f"spiffe://{td}/agent/planner"]
    return {"registrations": entries}


def provision(layout: DemoLayout, trust_domain: str = "example.org") -> Provisioned:
    """Write the dev PKI, the extra SVIDs, the registration file, the log keys and
    their public verifier keys (``keys/<log>.vkey``, what an auditor is given), and the
    witness: its keys (as ``axid witness init --name witness.TD/demo --dir
    witness/keys`` writes them), its vkey published as ``keys/witness.vkey``, and
    ``witness/witness.yaml`` naming both logs (what ``axid witness serve`` reads)."""
    td = parse_trust_domain(trust_domain)
    try:
        pki = init_dev_pki(layout.certs, td.name)
        pki.ca.issue_svid(SpiffeId(td, ADMIN_PATH)).write(layout.certs / "admin")
        # Another instance of the worker: the same SPIFFE ID, its own key and certificate.
        pki.ca.issue_svid(pki.spiffe_id("worker")).write(layout.certs / WORKER2_NAME)
        layout.registrations.write_text(
            "# axid demo: who may mint which tokens (see axid.issuer.registry)\n"
            + yaml.safe_dump(_registrations(td.name), sort_keys=False),
            encoding="utf-8",
        )
        layout.keys.mkdir(mode=0o700, exist_ok=True)
        vkeys = _provision_log_keys(layout)
        witness_vkey = _provision_witness(layout, f"witness.{td.name}/demo", vkeys)
    except (DevPkiError, LogKeyError, WitnessKeyError, OSError) as exc:
        raise DemoError(f"cannot set up the demo in {layout.root}: {exc}") from None
    return Provisioned(layout, pki, vkeys, witness_vkey)


def _provision_log_keys(layout: DemoLayout) -> dict[str, str]:
    """The two decision logs' keys and their vkeys (log name -> vkey), made here so that
    the auditor's verifier keys are known from the start, independently of what the
    database will later say."""
    vkeys = {}
    for log in (ISSUER_LOG, PAYMENTS_SERVICE):
        private = generate_log_key(layout.log_key(log))
        vkeys[log] = NoteSigner(origin_for(log), private).vkey()
        layout.vkey_file(log).write_text(vkeys[log] + "\n", encoding="ascii")
    return vkeys


def _provision_witness(layout: DemoLayout, name: str, vkeys: dict[str, str]) -> str:
    """The witness's keys and config (it witnesses every log in ``vkeys``); its vkey."""
    (key,) = init_keys(layout.witness_dir / "keys", name)
    vkey = key.vkey()
    layout.witness_vkey_file.write_text(vkey + "\n", encoding="ascii")
    config = {
        "listen": f"{DEMO_HOST}:0",
        "keys": "keys",
        "database": "sqlite:///witness.db",
        "logs": [{"origin": origin_for(log), "vkey": v} for log, v in vkeys.items()],
    }
    layout.witness_config.write_text(
        "# axid demo: the witness (axid witness serve --config witness.yaml)\n"
        + yaml.safe_dump(config, sort_keys=False, width=1000),
        encoding="utf-8",
    )
    return vkey
