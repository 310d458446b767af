"""Prometheus metrics of decision logs, for the registry of whoever runs them.

The log keeps plain counts; :class:`LogCollector` reads them at scrape time, so
the verifier and the issuer expose them in their own registries without the
log knowing either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CommitTimes", "LogCollector"]

_FAILURES = "axid_log_integrity_failures"
_REFUSALS = "axid_log_witness_refusals"
_LAG = "axid_log_witness_lag_entries"
_COMMIT = "axid_log_commit_seconds"

# Commit batches take from ~0.2 ms (SQLite fsync) to seconds (a stalled server).
_COMMIT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class CommitTimes:
    """Plain counts of commit-batch durations (seconds), read at scrape time.

    Only the log's batcher task observes, so no lock is needed; a scrape may read
    a count one batch behind the sum, which Prometheus tolerates.
    """

    __slots__ = ("_counts", "count", "sum")

    def __init__(self) -> None:
        self._counts = [0] * (len(_COMMIT_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(_COMMIT_BUCKETS) and seconds > _COMMIT_BUCKETS[i]:
            i += 1
        self._counts[i] += 1
        self.count += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
        out, total = [], 0
        for bound, n in zip((*map(str, _COMMIT_BUCKETS), "+Inf"), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class _Counted(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def integrity_failures(self) -> int: ...


class LogCollector(Collector):
    """For the logs ``logs()`` returns now: ``axid_log_integrity_failures_total{log}``,
    and for logs with witnesses ``axid_log_witness_refusals_total{log,witness}`` and
    ``axid_log_witness_lag_entries{log,witness}`` (the log's size minus the size
    of the latest checkpoint the witness cosigned), and for logs that time their
    commits ``axid_log_commit_seconds{log}`` (one observation per commit batch:
    the transaction with its fsync and checkpoint signature)."""

    def __init__(self, logs: Callable[[], Iterable[_Counted]]) -> None:
        self._logs = logs

    def collect(
        self,
    ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
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
        commits = HistogramMetricFamily(
            _COMMIT,
            "Duration of the decision log's commit batches "
            "(transaction, fsync, signed checkpoint).",
            labels=["log"],
        )
        for log in self._logs():
            failures.add_metric([log.name], log.integrity_failures)
            times = getattr(log, "commit_times", None)
            if isinstance(times, CommitTimes):
                commits.add_metric([log.name], times.buckets(), times.sum)
            for witness, n in _per_witness(log, "witness_refusals").items():
                refusals.add_metric([log.name, witness], n)
            for witness, n in _per_witness(log, "witness_lag").items():
                lag.add_metric([log.name, witness], n)
        yield failures
        yield refusals
        yield lag
        yield commits

    def describe(
        self,
    ) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        # Described without reading the logs (they may not be open at registration).
        yield CounterMetricFamily(_FAILURES, "", labels=["log"])
        yield CounterMetricFamily(_REFUSALS, "", labels=["log", "witness"])
        yield GaugeMetricFamily(_LAG, "", labels=["log", "witness"])
        yield HistogramMetricFamily(_COMMIT, "", labels=["log"])


def _per_witness(log: object, attr: str) -> Mapping[str, int]:
    # Logs without witnessing (or stand-ins in tests) have none.
    value = getattr(log, attr, None)
    return value if isinstance(value, Mapping) else {}
