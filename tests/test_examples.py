"""The examples in the README run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_seed_usage_example_prints_generated_text() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_usage.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("[llm-")
    assert "completed:" in first
    assert len(first.split("completed:", 1)[1].split()) == 32
    assert "SLO met: True" in proc.stdout


def test_readme_snippet_matches_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme
    assert "make test" in readme
    for line in ("RequestPriority[\"HIGH\"]", "await control_plane.submit_request(request)",
                 "await control_plane.wait_for_result(request_id)"):  # fmt: skip
        assert line in readme
        assert line in (ROOT / "examples" / "seed_usage.py").read_text()


def test_sage_pipeline_example_refuses_counts_below_one() -> None:
    for option, value in (("--max-tokens", "-1"), ("--waves", "0"), ("--per-wave", "x")):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "sage_pipeline" / "main.py"), option, value],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, proc.stdout  # before SAGE starts: nothing sent
        assert f"argument {option}: must be an integer >= 1, got" in proc.stderr
