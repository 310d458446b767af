"""ASGI middleware that governs requests: SPIFFE mTLS identity + AXID action token."""

__all__: list[str] = []
