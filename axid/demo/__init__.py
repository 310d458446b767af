"""``axid demo``: the whole AXID story on loopback, and its sample governed service.

- :mod:`axid.demo.payments`  the sample FastAPI service "payments" behind AxidVerifier
- :mod:`axid.demo.story`     the dev PKI, the issuer and payments over mTLS in one
                             process, the story's steps, the auditor's verification
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
    DemoError,
    DemoLayout,
    DemoStack,
    DemoUsageError,
    Provisioned,
    StepResult,
    play_story,
    prepare_directory,
    provision,
    run_demo,
    verify_logs,
)

__all__ = [
    "PAYMENTS_AUDIENCE",
    "PAYMENTS_RULES",
    "PAYMENTS_SERVICE",
    "PAYMENTS_TENANT",
    "SAMPLE_PAYMENTS",
    "AuditSummary",
    "DemoError",
    "DemoLayout",
    "DemoStack",
    "DemoUsageError",
    "Provisioned",
    "StepResult",
    "create_payments_app",
    "payments_verifier_config",
    "play_story",
    "prepare_directory",
    "provision",
    "run_demo",
    "verify_logs",
]
