"""``axid demo``: the whole AXID story on loopback, and its sample governed service.

- :mod:`axid.demo.payments`      the sample FastAPI service "payments" behind AxidVerifier
- :mod:`axid.demo.run`           ``run_demo``: the parts below in order, the exit code
- :mod:`axid.demo.provisioning`  the demo directory: dev PKI, registrations, log and witness keys
- :mod:`axid.demo.stack`         the witness, the issuer and payments, served as in production
- :mod:`axid.demo.steps`         the story: a table of steps (who, the request, the answer due)
- :mod:`axid.demo.play`          the loop that plays the table with real mTLS clients
- :mod:`axid.demo.audit`         the witness's cosignatures, the logs verified, the CLI checks
- :mod:`axid.demo.render`        what it prints
"""

from axid.demo.audit import (
    AuditSummary,
    CosignWait,
    WitnessedAudit,
    verify_logs,
    verify_witnessed,
    wait_for_cosignatures,
)
from axid.demo.payments import (
    PAYMENTS_AUDIENCE,
    PAYMENTS_RULES,
    PAYMENTS_SERVICE,
    PAYMENTS_TENANT,
    SAMPLE_PAYMENTS,
    create_payments_app,
    payments_verifier_config,
)
from axid.demo.play import StepResult, play_story
from axid.demo.provisioning import (
    DemoError,
    DemoLayout,
    DemoUsageError,
    Provisioned,
    prepare_directory,
    provision,
)
from axid.demo.run import run_demo
from axid.demo.stack import DemoStack

__all__ = [
    "PAYMENTS_AUDIENCE",
    "PAYMENTS_RULES",
    "PAYMENTS_SERVICE",
    "PAYMENTS_TENANT",
    "SAMPLE_PAYMENTS",
    "AuditSummary",
    "CosignWait",
    "DemoError",
    "DemoLayout",
    "DemoStack",
    "DemoUsageError",
    "Provisioned",
    "StepResult",
    "WitnessedAudit",
    "create_payments_app",
    "payments_verifier_config",
    "play_story",
    "prepare_directory",
    "provision",
    "run_demo",
    "verify_logs",
    "verify_witnessed",
    "wait_for_cosignatures",
]
