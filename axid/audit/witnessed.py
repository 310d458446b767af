"""The witness side of an audit: which verified checkpoints a quorum cosigned.

:class:`WitnessTally` counts, for each checkpoint the reference pass verified
(signature, size, root), the given witnesses whose cosignatures on it verify
(:class:`~axid.audit.quorum.WitnessPolicy`), and gives the report's witness
fields: the newest checkpoint with a quorum, and why there is none if so.
A cosignature that does not verify is the pass's finding to make.
"""

from __future__ import annotations

from typing import Any

from axid.audit.note import Checkpoint
from axid.audit.quorum import WitnessPolicy

__all__ = ["WitnessTally"]


class WitnessTally:
    """Cosignatures by the given witnesses on the checkpoints that verified."""

    def __init__(self, policy: WitnessPolicy) -> None:
        self.policy = policy
        self.witnessed: Checkpoint | None = None  # newest such checkpoint with a quorum
        self.witnessed_note: bytes | None = None
        self.cosigners: frozenset[str] = frozenset()
        self.most: tuple[int, frozenset[str]] | None = None  # (size, names) of the most

    def add(self, size: int, note: bytes, cp: Checkpoint) -> None:
        """Count a checkpoint that verified. Raises
        :class:`~axid.audit.cosignature.CosignatureError` when a cosignature on it
        that claims a given witness key does not verify.

        Only for a checkpoint whose signature, size and root check out: it is
        then one of the log's own, consistent with every other checkpoint and
        with the entries, so a quorum on it witnesses the log.
        """
        names = self.policy.cosigners(note, cp)
        if self.most is None or len(names) >= len(self.most[1]):
            self.most = (size, names)
        if self.policy.met_by(names):
            self.witnessed, self.witnessed_note, self.cosigners = cp, note, names

    def fields(self, entries: int, whole: bool) -> dict[str, Any]:
        """The report's witness fields for a log of ``entries``; ``whole``: the pass
        read the whole log and found nothing, so a missing quorum (or too long an
        unwitnessed tail) is the verdict."""
        policy = self.policy
        out: dict[str, Any] = {"quorum": policy.quorum, "witnesses": policy.names}
        cp = self.witnessed
        if cp is not None:
            out.update(
                witnessed_size=cp.size,
                witnessed_note=self.witnessed_note,
                cosigners=tuple(sorted(self.cosigners)),
                unwitnessed=entries - cp.size,
            )
        if whole:
            out["witness_failure"] = self._failure(entries)
        return out

    def _failure(self, entries: int) -> str | None:
        """Why the log is not witnessed as the policy asks, or None when it is."""
        policy, cp = self.policy, self.witnessed
        if cp is None:
            most = self.most
            seen = (
                "no checkpoint carries a valid cosignature by any of them"
                if most is None or not most[1]
                else f"the most any carries is {len(most[1])} (checkpoint {most[0]}: "
                f"{', '.join(sorted(most[1]))})"
            )
            return f"no checkpoint cosigned by {policy.describe()}: {seen}"
        after = entries - cp.size
        if policy.max_unwitnessed is not None and after > policy.max_unwitnessed:
            return (
                f"{after} entries after the newest checkpoint cosigned by {policy.describe()} "
                f"(size {cp.size}), more than the {policy.max_unwitnessed} allowed "
                "(--max-unwitnessed)"
            )
        return None
