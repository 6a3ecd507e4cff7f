"""README's "A federation by hand" block, run as written: a newcomer's three-department
federation from an empty folder — synthetic data, enrolment, node init, datasets, grants, three
serving nodes over mutual TLS, the analyst's queries and the auditor's checks — in bash, with
every command a real subprocess. Only the ports change (free ones instead of 7201-7203), and
``.venv`` is this test's interpreter's environment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
# Generous: three nodes and real cryptography on a shared, sometimes slow machine.
TIMEOUT = 900


def walkthrough() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(
        r"<!-- walkthrough:start -->\n```sh\n(.*?)```\n<!-- walkthrough:end -->", text, re.S
    )
    assert block is not None, "README.md lost its walkthrough block"
    return block.group(1)


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = walkthrough()
    for port in ("7201", "7202", "7203"):
        assert f"127.0.0.1:{port}" in script
        script = script.replace(port, str(free_port()))
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVSHARE_")}
    ran = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = ran.communicate(timeout=TIMEOUT)
    finally:
        if ran.poll() is None:
            os.killpg(ran.pid, signal.SIGKILL)
        # Nodes a failed run left behind (the block's own last line stops them otherwise).
        try:
            os.killpg(ran.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "trial").glob("*.log"))
    )
    assert ran.returncode == 0, out + logs
    # What the newcomer sees: three catalogues, three answers with their noise, verified logs,
    # no HIGH alert, the rights register with each department's dataset and alice's rights.
    for dataset in ("residents", "assistance", "clinic_visits"):
        assert dataset in out
    assert len(re.findall(r"\|intersection\| ≈ [\d,]+", out)) == 2, out
    for label in ("minimum_living", "extreme_poverty", "temporary", "disability"):
        assert label in out
    assert len(re.findall(r"receipt from .* verified", out)) == 3, out
    for node in ("tax", "civil", "health"):  # pulled, then verified from scratch
        assert len(re.findall(rf"^{node}: OK — ", out, re.M)) == 2, out
    # No HIGH alert. (A MEDIUM one is expected: the two queries on tax.residents differ by one
    # condition, income_band = 'high', within a day: the differencing rule.)
    assert re.search(r"check: 0 HIGH, \d+ MEDIUM", out), out
    assert "op-tax" in out and "alice" in out  # the register: who granted, who holds
