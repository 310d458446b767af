"""An auditor's witness quorum: whose cosignatures count, and how many are needed.

``axid audit verify`` and ``axid audit receipt check`` take ``--witness VKEY``
(repeatable) and ``--quorum K``: a checkpoint is *witnessed* when K distinct
witnesses among those given cosigned it (C2SP tlog-cosignature). Witnesses are
counted by key NAME: one witness with two keys (Ed25519 cosignature/v1 and
ML-DSA-44 subtree/v1 under one name) counts once. A cosignature line that
claims a given key (name and key ID) and does not verify is tampering
(:class:`~axid.audit.cosignature.CosignatureError`); lines by other keys are
ignored, as C2SP says.

Pure: no I/O. :class:`QuorumError` is a usage error (exit 2 in the CLI).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from axid.audit.cosignature import WitnessKey, cosigned_by
from axid.audit.errors import AuditError
from axid.audit.note import Checkpoint

__all__ = ["QuorumError", "WitnessPolicy"]


class QuorumError(AuditError, ValueError):
    """The witness options do not make a quorum (a usage error)."""


@dataclass(frozen=True)
class WitnessPolicy:
    """``quorum`` distinct witnesses among ``keys`` must cosign; optionally at most
    ``max_unwitnessed`` entries may follow the newest witnessed checkpoint."""

    keys: tuple[WitnessKey, ...]
    quorum: int
    max_unwitnessed: int | None = None

    def __post_init__(self) -> None:
        if not self.keys or not all(isinstance(k, WitnessKey) for k in self.keys):
            raise QuorumError("a quorum needs at least one witness key (--witness)")
        if type(self.quorum) is not int or self.quorum < 1:
            raise QuorumError(f"--quorum must be an integer of at least 1, not {self.quorum!r}")
        names = self.names
        if self.quorum > len(names):
            raise QuorumError(
                f"--quorum {self.quorum} but only {len(names)} distinct witness "
                f"{'name' if len(names) == 1 else 'names'} given ({', '.join(names)}); "
                "a witness's keys (Ed25519 and ML-DSA) count once"
            )
        m = self.max_unwitnessed
        if m is not None and (type(m) is not int or m < 0):
            raise QuorumError(f"--max-unwitnessed must be an integer >= 0, not {m!r}")

    @classmethod
    def from_options(
        cls,
        keys: Sequence[WitnessKey],
        quorum: int | None,
        max_unwitnessed: int | None = None,
    ) -> WitnessPolicy | None:
        """The policy the options ask for; None when none is asked for.

        ``--witness`` and ``--quorum`` go together; ``--max-unwitnessed`` needs both.
        """
        if not keys and quorum is None:
            if max_unwitnessed is not None:
                raise QuorumError("--max-unwitnessed needs --witness VKEY ... --quorum K")
            return None
        if quorum is None:
            raise QuorumError("--witness needs --quorum K (how many witnesses must cosign)")
        if not keys:
            raise QuorumError("--quorum needs the witnesses' keys: --witness VKEY (repeatable)")
        return cls(tuple(dict.fromkeys(keys)), quorum, max_unwitnessed)

    @property
    def names(self) -> tuple[str, ...]:
        """The distinct witness names, sorted."""
        return tuple(sorted({k.name for k in self.keys}))

    def cosigners(self, note: bytes, checkpoint: Checkpoint) -> frozenset[str]:
        """Names of the given witnesses whose cosignature on ``note`` verifies.

        ``checkpoint`` is the note's body (already verified with the log key).
        Raises :class:`~axid.audit.cosignature.CosignatureError` when a line
        claims one of the given keys and does not verify.
        """
        return cosigned_by(note, checkpoint, list(self.keys))

    def met_by(self, names: Iterable[str]) -> bool:
        """Whether these witness names make the quorum."""
        return len(set(names) & set(self.names)) >= self.quorum

    def describe(self) -> str:
        """``2 of the given witnesses (a, b, c)``."""
        return f"{self.quorum} of the given witnesses ({', '.join(self.names)})"
