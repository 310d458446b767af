"""Prometheus metrics of decision logs, for the registry of whoever runs them.

The log keeps plain counts; :class:`LogCollector` reads them at scrape time, so
the verifier and the issuer expose them in their own registries without the
log knowing either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["LogCollector"]

_FAILURES = "axid_log_integrity_failures"
_REFUSALS = "axid_log_witness_refusals"
_LAG = "axid_log_witness_lag_entries"


class _Counted(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def integrity_failures(self) -> int: ...


class LogCollector(Collector):
    """For the logs ``logs()`` returns now: ``axid_log_integrity_failures_total{log}``,
    and for logs with witnesses ``axid_log_witness_refusals_total{log,witness}`` and
    ``axid_log_witness_lag_entries{log,witness}`` (the log's size minus the size
    of the latest checkpoint the witness cosigned)."""

    def __init__(self, logs: Callable[[], Iterable[_Counted]]) -> None:
        self._logs = logs

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        failures = CounterMetricFamily(
            _FAILURES,
            "Integrity failures of the decision log (the database does not extend the "
            "authenticated head); the first one stops every append until restart.",
            labels=["log"],
        )
        refusals = CounterMetricFamily(
            _REFUSALS,
            "Witness refusals: answers other than a cosignature (or a 409 the log "
            "resynced from), and cosignatures that do not verify with the witness's key.",
            labels=["log", "witness"],
        )
        lag = GaugeMetricFamily(
            _LAG,
            "Entries of the log not covered by the latest checkpoint the witness cosigned.",
            labels=["log", "witness"],
        )
        for log in self._logs():
            failures.add_metric([log.name], log.integrity_failures)
            for witness, n in _per_witness(log, "witness_refusals").items():
                refusals.add_metric([log.name, witness], n)
            for witness, n in _per_witness(log, "witness_lag").items():
                lag.add_metric([log.name, witness], n)
        yield failures
        yield refusals
        yield lag

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # Described without reading the logs (they may not be open at registration).
        yield CounterMetricFamily(_FAILURES, "", labels=["log"])
        yield CounterMetricFamily(_REFUSALS, "", labels=["log", "witness"])
        yield GaugeMetricFamily(_LAG, "", labels=["log", "witness"])


def _per_witness(log: object, attr: str) -> Mapping[str, int]:
    # Logs without witnessing (or stand-ins in tests) have none.
    value = getattr(log, attr, None)
    return value if isinstance(value, Mapping) else {}
