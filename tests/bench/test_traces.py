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


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (dict(ROW, input_length="ten"), "input_length must be an integer, got 'ten'"),
        (dict(ROW, output_length=True), "output_length must be an integer, got True"),
        (dict(ROW, input_length=2.5), "input_length must be an integer, got 2.5"),
        (dict(ROW, output_length=-1), "output_length must be >= 0, got -1"),
        ([0, 10, 2], "expected a JSON object"),
    ],
)
def test_a_bad_mooncake_row_is_refused_at_its_line(
    tmp_path: Path, row: object, message: str
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        trace_replay(path)
    assert (info.value.location, info.value.detail) == (f"{path}:2", message)


def test_a_file_of_neither_format_is_refused_by_name(tmp_path: Path) -> None:
    """Without a known extension the first line decides; one of neither format is refused
    naming the file, as is a format asked for by a name that is not one."""
    path = tmp_path / "trace.txt"
    path.write_text("\n\ntime,tokens\n1,2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        trace_replay(path)
    assert info.value.location == str(path)
    assert info.value.detail == "unknown trace format (expected Mooncake JSONL or Azure CSV)"
    with pytest.raises(ConfigError) as info:
        trace_replay(path, trace_format="sharegpt")  # type: ignore[arg-type]
    assert (info.value.key, info.value.detail) == (
        "trace_format",
        "unknown trace_format 'sharegpt'",
    )


def test_the_first_line_names_the_format_of_a_file_without_an_extension(tmp_path: Path) -> None:
    mooncake = tmp_path / "mooncake.txt"
    mooncake.write_text("\n" + json.dumps(ROW) + "\n", encoding="utf-8")
    (request,) = trace_replay(mooncake).requests
    assert request.prompt_tokens == 10 and request.max_tokens == 2
    azure = tmp_path / "azure.log"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.0000000,12,3\n",
        encoding="utf-8",
    )
    requests = trace_replay(azure, limit=2).requests  # the limit keeps the first rows
    assert [(r.prompt_tokens, r.max_tokens) for r in requests] == [(374, 44), (396, 109)]
    assert requests[1].arrival_s == pytest.approx(4.314579)
