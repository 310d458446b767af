"""Prometheus metrics of decision logs, for the registry of whoever runs them.

The log keeps plain counts; :class:`LogCollector` reads them at scrape time, so
the verifier and the issuer expose them in their own registries without the
log knowing either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["LogCollector"]


class _Counted(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def integrity_failures(self) -> int: ...


class LogCollector(Collector):
    """``axid_log_integrity_failures_total{log}`` for the logs ``logs()`` returns now."""

    def __init__(self, logs: Callable[[], Iterable[_Counted]]) -> None:
        self._logs = logs

    def collect(self) -> Iterator[CounterMetricFamily]:
        failures = CounterMetricFamily(
            "axid_log_integrity_failures",
            "Integrity failures of the decision log (the database does not extend the "
            "authenticated head); the first one stops every append until restart.",
            labels=["log"],
        )
        for log in self._logs():
            failures.add_metric([log.name], log.integrity_failures)
        yield failures

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Described without reading the logs (they may not be open at registration).
        yield CounterMetricFamily("axid_log_integrity_failures", "", labels=["log"])
