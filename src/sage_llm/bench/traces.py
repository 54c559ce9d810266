"""Trace replay: Mooncake and Azure LLM inference traces as workloads
(see :mod:`sage_llm.bench.workloads`)."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np

from sage_llm.bench.sharegpt import DatasetNotFoundError
from sage_llm.bench.workload_core import (
    TRACE_BLOCK_TOKENS,
    Workload,
    WorkloadRequest,
    check_arg,
    mix_key,
    text_prompt,
    token_block,
)
from sage_llm.errors import ConfigError

# --- trace replay ---------------------------------------------------------------------

TraceFormat: TypeAlias = Literal["auto", "mooncake", "azure"]
_Row: TypeAlias = tuple[float, int, int, list[int] | None]  # arrival s, in, out, hash_ids


def _detect_format(path: Path) -> Literal["mooncake", "azure"]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "mooncake"
    if "ContextTokens" in first:
        return "azure"
    raise ConfigError(
        "unknown trace format (expected Mooncake JSONL or Azure CSV)", location=str(path)
    )


def _count(value: object, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key} must be an integer, got {value!r}", location=where)
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {value!r}", location=where) from None
    if number < 0:
        raise ConfigError(f"{key} must be >= 0, got {number}", location=where)
    if number > MAX_TRACE_TOKENS:  # its prompt would be built, token by token, first
        raise ConfigError(
            f"{key} must be at most {MAX_TRACE_TOKENS} tokens (more than any model's "
            f"context), got {number}",
            location=where,
        )
    return max(number, 1)


MAX_TRACE_TOKENS = 1 << 20
"""The longest prompt or output a trace row may give (a row of 10 billion tokens had been
built into a prompt until memory ran out)."""


def _mooncake_rows(path: Path, limit: int | None) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"invalid JSON: {exc.msg}", location=where) from None
            if not isinstance(item, dict):
                raise ConfigError("expected a JSON object", location=where)
            missing = {"timestamp", "input_length", "output_length"} - item.keys()
            if missing:
                raise ConfigError(f"missing {', '.join(sorted(missing))}", location=where)
            hash_ids = item.get("hash_ids", [])
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
                raise ConfigError("hash_ids must be a list of integers", location=where)
            ts = item["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
                raise ConfigError(f"timestamp must be a finite number, got {ts!r}", location=where)
            input_length = _count(item["input_length"], where, "input_length")
            output_length = _count(item["output_length"], where, "output_length")
            rows.append((ts / 1000.0, input_length, output_length, hash_ids))
    return rows


def _azure_rows(path: Path, limit: int | None) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"missing columns {', '.join(sorted(missing))}", location=f"{path}:1")
        first: datetime | None = None
        for record in reader:
            if limit is not None and len(rows) >= limit:
                break
            where = f"{path}:{reader.line_num}"
            try:
                stamp = datetime.fromisoformat(record["TIMESTAMP"].strip())
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"bad TIMESTAMP {record['TIMESTAMP']!r}", location=where
                ) from None
            first = stamp if first is None else first
            if (stamp.tzinfo is None) != (first.tzinfo is None):
                raise ConfigError(
                    f"TIMESTAMP {record['TIMESTAMP']!r} "
                    f"{'has no' if stamp.tzinfo is None else 'has a'} time zone where the "
                    "first row's "
                    f"{'has one' if stamp.tzinfo is None else 'has none'}: give every row "
                    "one, or none",
                    location=where,
                )
            context = _count(record["ContextTokens"], where, "ContextTokens")
            generated = _count(record["GeneratedTokens"], where, "GeneratedTokens")
            rows.append(((stamp - first).total_seconds(), context, generated, None))
    return rows


def trace_replay(
    path: Path | str,
    *,
    limit: int | None = None,
    time_scale: float = 1.0,
    max_input_tokens: int | None = None,
    seed: int = 0,
    trace_format: TraceFormat = "auto",
    model: str | None = None,
) -> Workload:
    """Replay a public request trace: Mooncake JSONL (``timestamp`` ms, ``input_length``,
    ``output_length``, ``hash_ids``) or Azure CSV (``TIMESTAMP``, ``ContextTokens``,
    ``GeneratedTokens``). The format comes from the extension (``.jsonl``/``.json`` vs
    ``.csv``) or, failing that, from the first line.

    * arrivals: offsets from the earliest row, multiplied by ``time_scale`` (0.5 replays
      twice as fast); rows are ordered by time (stable);
    * ``limit``: read only the first ``limit`` rows of the file;
    * ``max_input_tokens``: longer prompts are cut to this length (prefixes stay shared);
      zero lengths in the trace become 1;
    * Mooncake prompts are token ids: hash id *h* maps to 512 fixed ids (salted by
      ``seed``), the last block cut to ``input_length``; missing ids are padded with
      request-unique blocks. Azure prompts are text (no prefix information in the trace).

    Memory: token-id prompts take 8 bytes per token; the whole Mooncake conversation trace
    is about 145M tokens, so use ``limit`` or ``max_input_tokens`` for smaller runs.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"trace file not found: {path}")
    check_arg(limit is None or limit >= 0, "limit", f"limit must be >= 0, got {limit}")
    check_arg(time_scale > 0 and math.isfinite(time_scale), "time_scale", "must be > 0")
    check_arg(max_input_tokens is None or max_input_tokens >= 1, "max_input_tokens", "must be >= 1")
    fmt = _detect_format(path) if trace_format == "auto" else trace_format
    if fmt == "mooncake":
        rows = _mooncake_rows(path, limit)
    elif fmt == "azure":
        rows = _azure_rows(path, limit)
    else:
        raise ConfigError(f"unknown trace_format {fmt!r}", key="trace_format")
    start = min((row[0] for row in rows), default=0.0)
    rng = np.random.default_rng(seed)
    requests: list[WorkloadRequest] = []
    for i in sorted(range(len(rows)), key=lambda j: rows[j][0]):
        ts, input_length, output_length, hash_ids = rows[i]
        n = input_length if max_input_tokens is None else min(input_length, max_input_tokens)
        prompt: str | list[int]
        if hash_ids is None:
            prompt = text_prompt(rng, n)
        else:
            blocks = -(-n // TRACE_BLOCK_TOKENS)
            prompt = token_block(seed, hash_ids[:blocks])
            if len(hash_ids) < blocks:
                prompt += token_block(mix_key(seed, 1, i), range(blocks - len(hash_ids)))
            del prompt[n:]
        requests.append(
            WorkloadRequest(
                request_id=f"trace-{i:06d}",
                arrival_s=(ts - start) * time_scale,
                prompt=prompt,
                prompt_tokens=n,
                max_tokens=output_length,
                model=model,
            )
        )
    return Workload(
        name=f"trace:{path.name}",
        requests=tuple(requests),
        description=f"{fmt} trace {path.name}, {len(requests)} requests",
        params={
            "path": str(path),
            "format": fmt,
            "limit": limit,
            "time_scale": time_scale,
            "max_input_tokens": max_input_tokens,
            "seed": seed,
        },
    )
