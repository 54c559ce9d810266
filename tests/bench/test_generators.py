"""Promises of the workload generators (synthetic, ShareGPT(-like), multi-turn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sage_llm.bench.generators import sharegpt, sharegpt_like, synthetic
from sage_llm.errors import ConfigError
from sage_llm.tokens import count_tokens


def test_synthetic_users_are_drawn_by_the_seed() -> None:
    def users(seed: int) -> list[str | None]:
        return [r.user_id for r in synthetic(50, 5.0, 8, 4, seed=seed, n_users=4)]

    assert users(3) == users(3)
    assert users(3) != users(4)


def test_sharegpt_like_is_deterministic_per_seed() -> None:
    first = sharegpt_like(50, 5.0, seed=1)
    assert first == sharegpt_like(50, 5.0, seed=1)
    other = sharegpt_like(50, 5.0, seed=2)
    assert [r.prompt_tokens for r in first] != [r.prompt_tokens for r in other]
    assert [r.arrival_s for r in first] != [r.arrival_s for r in other]


def test_sharegpt_skips_under_4_tokens_and_keeps_lengths_at_the_caps(tmp_path: Path) -> None:
    def conversation(prompt: str, reply: str) -> dict[str, object]:
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        return {"id": prompt, "conversations": turns}

    at_caps = conversation("one two three four five six", "a b c d")  # 6 + 4 tokens
    short_reply = conversation("four words in here", "only three words")
    assert count_tokens("one two three four five six") == 6
    assert count_tokens("only three words") == 3
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([at_caps, short_reply]), encoding="utf-8")
    workload = sharegpt(path, 1, 1.0, max_prompt_tokens=6, max_total_tokens=10)
    assert [(r.prompt_tokens, r.max_tokens) for r in workload] == [(6, 4)]
    with pytest.raises(ConfigError, match="only 1 usable"):  # a 3-token reply is skipped
        sharegpt(path, 2, 1.0)
