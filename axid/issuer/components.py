"""What an issuer app runs on: its source, keyring, store, registry and log settings."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from axid.audit.witnessing import DEFAULT_WITNESS_TIMEOUT, WitnessConfig
from axid.issuer.approval_settings import ApprovalSettings
from axid.issuer.config import DEFAULT_LOG_KEY, DEFAULT_LOG_NAME, IssuerConfig
from axid.issuer.registry import Registry
from axid.issuer.store import IssuerStore
from axid.keys import Keyring, KeyringError
from mtls.sources import FileSource, WorkloadApiSource, X509Source
from mtls.spiffeid import SpiffeIdPattern

__all__ = ["IssuerComponents", "load_or_init_keyring"]

_log = logging.getLogger(__name__)


def load_or_init_keyring(directory: str | os.PathLike[str], *, now: float) -> Keyring:
    """Load the keyring in ``directory``, creating it (one current key) if absent."""
    path = Path(directory)
    if not (path / "keyring.json").exists():
        try:
            return Keyring.init(path, now=now)
        except KeyringError:
            if not (path / "keyring.json").exists():
                raise
            # Another process (a replica) initialised it first: use that one.
    return Keyring.load(path)


@dataclass
class IssuerComponents:
    """What an issuer app runs on. Build one with :meth:`from_config`, or by hand in
    tests and embedders (then the caller owns and closes the parts)."""

    iss: str
    source: X509Source
    keyring: Keyring
    store: IssuerStore
    registry: Registry
    audit_url: str
    log_name: str = DEFAULT_LOG_NAME
    log_origin: str | None = None  # default: axid/<log_name>
    log_key: Path | Ed25519PrivateKey = DEFAULT_LOG_KEY
    log_head: Path | None = None
    log_head_required: bool = False
    log_witnesses: tuple[WitnessConfig, ...] = ()
    log_quorum: int | None = None
    log_witness_mode: str = "async"
    log_witness_timeout: float = DEFAULT_WITNESS_TIMEOUT
    admins: tuple[SpiffeIdPattern, ...] = ()
    approvals: ApprovalSettings = field(default_factory=ApprovalSettings)
    default_ttl: int = 120
    max_ttl: int = 300
    owned: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def from_config(
        cls, config: IssuerConfig, *, clock: Callable[[], float] = time.time
    ) -> IssuerComponents:
        """Open the source, registry, keyring (created if absent) and database."""
        owned: list[Any] = []
        try:
            registry = Registry.from_file(config.registrations)
            source: X509Source
            if config.workload_api is not None:
                source = WorkloadApiSource(config.workload_api)
            else:
                assert config.cert and config.key and config.bundle  # checked by the config
                source = FileSource(config.cert, config.key, config.bundle)
            owned.append(source)
            keyring = load_or_init_keyring(config.keys_dir, now=math.floor(clock()))
            store = IssuerStore.open(config.database_url)
            owned.append(store)
        except BaseException:
            for item in reversed(owned):
                item.close()
            raise
        return cls(
            iss=config.iss,
            source=source,
            keyring=keyring,
            store=store,
            registry=registry,
            audit_url=config.audit_url,
            log_name=config.log_name,
            log_origin=config.log_origin,
            log_key=config.log_key,
            log_head=config.log_head,
            log_head_required=config.log_head_required,
            log_witnesses=config.log_witnesses,
            log_quorum=config.log_quorum,
            log_witness_mode=config.log_witness_mode,
            log_witness_timeout=config.log_witness_timeout,
            admins=config.admins,
            approvals=config.approvals,
            default_ttl=config.default_ttl,
            max_ttl=config.max_ttl,
            owned=owned,
        )

    def close(self) -> None:
        """Close what :meth:`from_config` opened (nothing for hand-built components)."""
        while self.owned:
            item = self.owned.pop()
            try:
                item.close()
            except Exception:  # closing must not stop closing the rest
                _log.warning("error closing %s", type(item).__name__, exc_info=True)
