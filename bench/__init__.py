"""AXID benchmarks, driven by ``axid bench`` (see :mod:`bench._harness`).

Each module registers its benchmarks by name with
:func:`bench._harness.register`; ``axid bench`` imports the modules it finds
(``tokens``, ``log``, ``issuer``, ``verifier``, ``witness``) and reports a missing one's
benchmarks as skipped. Source checkouts only: a wheel ships no ``bench/``.
"""
