"""`axid bench`: the command runs the real benchmarks and writes the documented JSON.

Shape only: no timing thresholds (the figures depend on the machine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import axid

AXID_BIN = str(Path(sys.executable).parent / "axid")
REPO = Path(axid.__file__).resolve().parent.parent
RESULT_FIELDS = {"name", "value", "unit", "baseline", "baseline_value", "ratio"}


def _axid(
    *args: str, cwd: Path, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Run ``axid``; ``env`` adds variables to this process's (None: removes one)."""
    full = {**os.environ, **(env or {})}
    return subprocess.run(
        [AXID_BIN, *args],
        cwd=cwd,
        env={k: v for k, v in full.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bench_quick_json_shape(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    p = _axid(
        "bench",
        "--quick",
        "--only",
        "token.mint,token.verify",
        "--iterations",
        "20",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert set(doc) >= {"machine", "results"}
    machine = doc["machine"]
    for key in ("cpu", "cores", "memory_bytes", "python", "os", "cryptography", "openssl", "date"):
        assert key in machine
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    results = doc["results"]
    assert [r["name"] for r in results] == ["token.mint", "token.verify"]
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert isinstance(r["unit"], str) and r["unit"] == "ops/s"
        assert isinstance(r["baseline"], str) and r["baseline"]
        for k in ("value", "baseline_value", "ratio"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0
        assert math.isclose(r["ratio"], r["value"] / r["baseline_value"], rel_tol=1e-9)
    assert doc.get("skipped", []) == []
    # The human table names both benchmarks.
    assert "token.mint" in p.stdout and "token.verify" in p.stdout


def test_bench_log_benchmarks_json_shape(tmp_path: Path) -> None:
    # log.append_pg writes to the test server when there is one (2 writer processes,
    # one append per caller), else it is skipped with its reason.
    pg_url = os.environ.get("AXID_TEST_DATABASE_URL")
    out = tmp_path / "out.json"
    p = _axid(
        "bench",
        "--quick",
        "--only",
        "log.append,log.append_pg,log.verify,log.proof",
        "--iterations",
        "64",
        "--log-size",
        "3000",
        "--json",
        str(out),
        cwd=tmp_path,
        env={"AXID_BENCH_DATABASE_URL": pg_url},
    )
    assert p.returncode == 0, p.stderr + p.stdout
    doc = json.loads(out.read_text())
    results = doc["results"]
    names = ["log.append", "log.append_pg", "log.verify", "log.proof"]
    units = ["ops/s", "ops/s", "entries/s", "µs/op"]
    if pg_url is None:
        assert doc["skipped"] == [
            {
                "name": "log.append_pg",
                "reason": "AXID_BENCH_DATABASE_URL is not set (a postgresql:// URL to write to)",
            }
        ]
        del names[1], units[1]
    else:
        assert doc["skipped"] == []
    assert [r["name"] for r in results] == names
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert r["value"] > 0 and r["baseline_value"] > 0
        assert math.isclose(r["ratio"], r["value"] / r["baseline_value"], rel_tol=1e-9)
    assert [r["unit"] for r in results] == units
    assert "3,000-entry log" in p.stdout  # the size used is in the human table only


def test_bench_verifier_and_issuer_benchmarks_json_shape(tmp_path: Path) -> None:
    # Real servers (issuer, governed service, bare baselines) in subprocesses over
    # mTLS on loopback; tiny counts: shape only.
    out = tmp_path / "out.json"
    names = [
        "token.verify_cached",
        "issuer.mint_http",
        "verifier.governed_rps",
        "verifier.latency_p50",
        "verifier.latency_p99",
        "verifier.check_cached",
    ]
    p = _axid(
        "bench",
        "--quick",
        "--only",
        ",".join(names),
        "--iterations",
        "40",
        "--json",
        str(out),
        cwd=tmp_path,
        env={"TMPDIR": str(tmp_path)},  # the run's temporary directory, servers' cwd
    )
    assert p.returncode == 0, p.stderr + p.stdout
    doc = json.loads(out.read_text())
    assert doc.get("skipped", []) == []
    results = doc["results"]
    assert [r["name"] for r in results] == names
    assert [r["unit"] for r in results] == ["ops/s"] * 3 + ["µs/op"] * 2 + ["ops/s"]
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert isinstance(r["baseline"], str) and r["baseline"]
        for k in ("value", "baseline_value", "ratio"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0
        assert math.isclose(r["ratio"], r["value"] / r["baseline_value"], rel_tol=1e-9)
    # Human-only details are in the table (rich may wrap them between words).
    for word in ("decisions", "mints", "fresh", "TokenCache", "sequential"):
        assert word in p.stdout
    # Both percentiles come from one measurement: the same samples, in order.
    p50, p99 = results[3], results[4]
    assert p50["value"] <= p99["value"] and p50["baseline_value"] <= p99["baseline_value"]
    # No server process outlives the command, and its temporary directory is gone.
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.glob("axid-bench-*")) == []


WITNESS_BENCHES = [
    "log.append_witnessed_async_p50",
    "log.append_witnessed_sync_p50",
    "witness.add_checkpoint",
]


def test_bench_witness_benchmarks_json_shape(tmp_path: Path) -> None:
    # A real `axid witness serve` process on loopback (SQLite state); tiny counts.
    out = tmp_path / "out.json"
    p = _axid(
        "bench",
        "--quick",
        "--only",
        ",".join(reversed(WITNESS_BENCHES)),  # reported in the known order anyway
        "--iterations",
        "16",
        "--json",
        str(out),
        cwd=tmp_path,
        env={"TMPDIR": str(tmp_path)},
    )
    assert p.returncode == 0, p.stderr + p.stdout
    doc = json.loads(out.read_text())
    assert doc.get("skipped", []) == []
    results = doc["results"]
    assert [r["name"] for r in results] == WITNESS_BENCHES
    assert [r["unit"] for r in results] == ["µs/op", "µs/op", "ops/s"]
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert isinstance(r["baseline"], str) and r["baseline"]
        for k in ("value", "baseline_value", "ratio"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0
        assert math.isclose(r["ratio"], r["value"] / r["baseline_value"], rel_tol=1e-9)
    async_p50, sync_p50, _ = results
    # The sync figure's baseline is the async figure, from the same run.
    assert sync_p50["baseline_value"] == async_p50["value"]
    assert "sequential caller" in p.stdout and "keep-alive" in p.stdout
    # The witness process is gone, and so is the run's temporary directory.
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.glob("axid-bench-*")) == []


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        if text in args:
            found.append(args)
    return found


def _layout(root: Path, parts: tuple[str, ...], *, without: tuple[str, ...] = ()) -> Path:
    """A copy of some top-level parts of the source tree, minus the files named."""
    for part in parts:
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in without:
        (root / rel).unlink()
    return root


def _axid_from(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI with only ``site`` on the import path (not the installed checkout)."""
    return subprocess.run(
        [sys.executable, "-c", "from axid.cli import main; main()", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bench_missing_module_is_skipped_with_reason(tmp_path: Path) -> None:
    # A checkout whose bench/issuer.py is missing still reports the other figures and
    # names the missing one with its reason, instead of failing the whole run.
    site = _layout(
        tmp_path / "site",
        ("axid", "mtls", "verifier", "bench"),
        without=("bench/issuer.py", "bench/verifier.py"),
    )
    out = tmp_path / "out.json"
    p = _axid_from(
        site,
        "bench",
        "--quick",
        "--only",
        "issuer.mint_http,token.mint",
        "--iterations",
        "50",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["results"]] == ["token.mint"]
    assert doc["skipped"] == [
        {"name": "issuer.mint_http", "reason": "bench/issuer.py is not there"}
    ]


def test_bench_unknown_name_is_a_usage_error(tmp_path: Path) -> None:
    p = _axid("bench", "--only", "token.mint,no.such.bench", cwd=tmp_path)
    assert p.returncode == 2
    assert "no.such.bench" in p.stderr


def test_bench_without_source_checkout_exits_2(tmp_path: Path) -> None:
    # An installed layout: the packages without bench/ beside them.
    site = _layout(tmp_path / "site", ("axid", "mtls", "verifier"))
    p = _axid_from(site, "bench", "--quick", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "bench/" in p.stderr and "source checkout" in p.stderr
