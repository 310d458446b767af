"""``axid demo``: the whole AXID story on loopback, and its sample governed service.

- :mod:`axid.demo.payments`  the sample FastAPI service "payments" behind AxidVerifier
- :mod:`axid.demo.story`     the dev PKI, a witness, the issuer and payments over mTLS
                             in one process, the story's steps, the auditor's
                             verification (with the witness's cosignatures)
"""

from axid.demo.payments import (
    PAYMENTS_AUDIENCE,
    PAYMENTS_RULES,
    PAYMENTS_SERVICE,
    PAYMENTS_TENANT,
    SAMPLE_PAYMENTS,
    create_payments_app,
    payments_verifier_config,
)
from axid.demo.story import (
    AuditSummary,
    CosignWait,
    DemoError,
    DemoLayout,
    DemoStack,
    DemoUsageError,
    Provisioned,
    StepResult,
    WitnessedAudit,
    play_story,
    prepare_directory,
    provision,
    run_demo,
    verify_logs,
    verify_witnessed,
    wait_for_cosignatures,
)

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
