"""The C2SP tlog-witness service (``axid witness``): cosigns a log's checkpoints
after checking that each one extends the last it cosigned.

- :mod:`axid.witness.protocol`  the ``add-checkpoint`` body and the decision (pure)
- :mod:`axid.witness.keys`      the key directory ``axid witness init`` writes
- :mod:`axid.witness.config`    the ``witness.yaml`` schema
- :mod:`axid.witness.store`     latest cosigned checkpoint per origin, evidence
- :mod:`axid.witness.app`       the ASGI app serving ``POST /add-checkpoint``
- :mod:`axid.witness.server`    uvicorn around it

Imports of the rest of AXID: only :mod:`axid.audit`'s pure modules (note,
merkle, cosignature).
"""

from axid.witness.app import WitnessApp
from axid.witness.config import WitnessConfig, WitnessConfigError, parse_config
from axid.witness.errors import WitnessError
from axid.witness.keys import WitnessKeyError, init_keys, load_signers
from axid.witness.server import (
    WitnessStartupError,
    serve,
    witness_socket,
    witness_uvicorn_config,
)
from axid.witness.store import Evidence, WitnessStore, WitnessStoreError

__all__ = [
    "Evidence",
    "WitnessApp",
    "WitnessConfig",
    "WitnessConfigError",
    "WitnessError",
    "WitnessKeyError",
    "WitnessStartupError",
    "WitnessStore",
    "WitnessStoreError",
    "init_keys",
    "load_signers",
    "parse_config",
    "serve",
    "witness_socket",
    "witness_uvicorn_config",
]
