"""What the verifier writes, read back safely, and its key files: `axid audit show`
prints request paths (client-chosen text) literally, and the decision log's key is
never read through a symbolic link."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from axid.audit.log import DecisionLog
from axid.audit.store import LogKeyError, generate_log_key, load_log_key
from axid.cli import app

# Paths a client can put in the log: rich markup, emoji codes, terminal controls.
HOSTILE = {
    "/a/[/]": "/a/[/]",  # a closing tag with nothing open: crashed rich
    "/b/[conceal]x": "/b/[conceal]x",  # would hide the rest of the cell
    "/c/[bold red]y[/bold red]": "/c/[bold red]y[/bold red]",
    "/d/:thumbs_up:": "/d/:thumbs_up:",
    "/e/\x1b[2Jz\x07": "/e/\\x1b[2Jz\\x07",  # clear screen, bell: shown escaped
}


async def test_audit_show_prints_stored_values_literally(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/axid.db"
    log = await DecisionLog.open(
        url, log="payments", key=tmp_path / "log.pem", create_key=True, max_delay=0
    )
    try:
        for path in HOSTILE:
            await log.append(
                {"decision": "deny", "reason": "no_peer_cert", "method": "GET", "path": path}
            )
        await log.append({"decision": "deny", "reason": "token_missing", "agent": "[/]"})
    finally:
        await log.close()
    result = CliRunner().invoke(app, ["audit", "show", "--db", url, "--log", "payments"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for shown in HOSTILE.values():
        assert shown in out, shown
    assert "\x1b" not in out and "\x07" not in out
    assert "\N{THUMBS UP SIGN}" not in out
    assert "6 entries" in out


def test_log_key_is_not_read_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.pem"
    generate_log_key(real)
    load_log_key(real)  # the file itself is fine
    link = tmp_path / "log.pem"
    link.symlink_to(real)
    with pytest.raises(LogKeyError, match="symbolic link"):
        load_log_key(link)
