"""The signed, hash-chained, Merkle-checkpointed decision log."""

__all__: list[str] = []
