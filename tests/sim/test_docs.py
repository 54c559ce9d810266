"""docs/simulator.md's code samples run as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in _BLOCK.findall(DOC.read_text()) if kind == lang]


def test_every_python_sample_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sample runs on its own (its own imports), in a directory holding the doc's TOML
    sample as ``specs.toml`` (the file the spec-loading sample reads)."""
    (toml,) = blocks("toml")
    (tmp_path / "specs.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    samples = blocks("python")
    assert len(samples) >= 3
    outputs = []
    for sample in samples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(sample, str(DOC), "exec"), {"__name__": "__doc_sample__"})
        outputs.append(out.getvalue())
    # the first sample streams a request: eight chunks, the last with its finish and usage
    lines = outputs[0].splitlines()
    assert len(lines) == 8
    assert " length Usage(" in lines[-1] and "completion_tokens=8" in lines[-1]
