"""docs/walkthrough.md, run as written (issue 21 item 15): every ```bash block of the page, in
order, in one bash session, on real processes (SuperLink, coordinator, two node daemons with
their SuperNodes, real DP-SGD). The only change: the page's fixed ports (8080 for the
coordinator, 9093 for the SuperLink) become free ones, so the test can run beside others.
The page's last block checks that the study completed and downloads the model. The time it
takes is mostly the ~25 `exchange` commands' start-up; docs/benchmarks.md has it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "walkthrough.md"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def doc_script() -> str:
    """The page's bash blocks, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert len(blocks) >= 8, "the walk-through lost its commands"
    return "\n".join(blocks)


def test_every_sample_file_the_page_names_is_shipped() -> None:
    text = DOC.read_text()
    for name in re.findall(r"\$SAMPLES/([\w./-]+)", text):
        assert (REPO_ROOT / "docs" / "walkthrough" / name).exists(), name


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = doc_script().replace("8080", str(_free_port())).replace("9093", str(_free_port()))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "walkthrough").symlink_to(REPO_ROOT / "docs" / "walkthrough")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    env.update(PATH=f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONPATH=str(REPO_ROOT))
    # stop what the page started in the background, however it ends (the page says `kill $(jobs -p)`)
    wrapped = "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    result = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1500, check=False)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                     for p in sorted((tmp_path / "walk").glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{logs}"
    out = result.stdout
    assert "imported 41 records for 40 patients" in out
    assert re.search(r"b-003.*inactive", out)  # the consent list's row after the update
    assert "Waiting for your decision (1)" in out
    assert '"status": "completed"' in out
    assert (tmp_path / "walk" / "model.safetensors").stat().st_size > 0
