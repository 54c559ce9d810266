"""Promises of trace replay (Mooncake JSONL, Azure CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sage_llm.bench.traces import trace_replay
from sage_llm.bench.workload_core import TRACE_BLOCK_TOKENS as B
from sage_llm.errors import ConfigError

ROW = {"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}


def test_mooncake_errors_name_the_file_line_counting_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n" + "not json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid JSON") as info:
        trace_replay(path)
    assert info.value.location == f"{path}:3"


def test_mooncake_padding_blocks_are_unique_to_each_request(tmp_path: Path) -> None:
    rows = [dict(ROW, input_length=2 * B, hash_ids=[0]), dict(ROW, input_length=2 * B)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    a, b = trace_replay(path).requests
    assert a.prompt[:B] == b.prompt[:B]  # hash id 0, shared
    assert a.prompt[B:] != b.prompt[B:]  # padding, one block each: not shared
