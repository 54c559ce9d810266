"""KeyLocator: the line of every key, table and array element of a TOML text."""

from __future__ import annotations

import json
import tomllib

import pytest

from sage_llm.config_locate import (
    JsonKeyLocator,
    KeyLocator,
    Problems,
    format_key,
    read_toml,
    syntax_error,
)
from sage_llm.errors import ConfigError

DOC = '''\
# comment
title = "x"

[services.llm_control_plane]
scheduling_policy = "fifo"
pd.enabled = true
"quoted.key" = 1

[[services.llm_control_plane.instances]]
instance_id = "a"
port = 8000

[services.llm_control_plane.instances.prefilling_config]
chunk_size = 1024

[[services.llm_control_plane.instances]]
instance_id = "b"
text = """
[not.a.table]
port = 1
"""
port = 8001

[gateway]
api_keys = [
  "k1",
  "k2",
]
inline = { host = "h", nested = { deep = 1 } }
fleet = [
  { id = "x" },
  { id = "y", port = 2 },
]
'''


@pytest.fixture
def locator() -> KeyLocator:
    tomllib.loads(DOC)  # the locator assumes valid TOML
    return KeyLocator(DOC)


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("title",), 2),
        (("services", "llm_control_plane"), 4),
        (("services", "llm_control_plane", "scheduling_policy"), 5),
        (("services", "llm_control_plane", "pd"), 6),
        (("services", "llm_control_plane", "pd", "enabled"), 6),
        (("services", "llm_control_plane", "quoted.key"), 7),
        (("services", "llm_control_plane", "instances"), 9),
        (("services", "llm_control_plane", "instances", 0), 9),
        (("services", "llm_control_plane", "instances", 0, "port"), 11),
        (("services", "llm_control_plane", "instances", 0, "prefilling_config"), 13),
        (("services", "llm_control_plane", "instances", 0, "prefilling_config", "chunk_size"), 14),
        (("services", "llm_control_plane", "instances", 1), 16),
        (("services", "llm_control_plane", "instances", 1, "instance_id"), 17),
        (("services", "llm_control_plane", "instances", 1, "port"), 22),
        (("gateway", "api_keys"), 25),
        (("gateway", "api_keys", 1), 27),
        (("gateway", "inline", "host"), 29),
        (("gateway", "inline", "nested", "deep"), 29),
        (("gateway", "fleet", 0, "id"), 31),
        (("gateway", "fleet", 1, "port"), 32),
    ],
)
def test_line_of_written_keys(locator: KeyLocator, path: tuple[str | int, ...], line: int) -> None:
    assert locator.line_of(path) == line


def test_unwritten_key_falls_back_to_nearest_ancestor(locator: KeyLocator) -> None:
    assert locator.line_of(("services", "llm_control_plane", "instances", 1, "gpu_count")) == 16
    assert locator.line_of(("gateway", "port")) == 24
    assert locator.line_of(("health", "interval_s")) is None


def test_lines_inside_multiline_strings_are_not_keys(locator: KeyLocator) -> None:
    assert locator.line_of(("not",)) is None
    assert locator.line_of(("services", "llm_control_plane", "instances", 1, "text")) == 18


def test_literal_strings_and_hash_inside_strings() -> None:
    text = "a = 'x # not a comment'\nb = \"[c]\" # comment\n'lit.key' = '''\nz = 1\n'''\nd = 4\n"
    assert tomllib.loads(text)["d"] == 4
    loc = KeyLocator(text)
    assert (loc.line_of(("b",)), loc.line_of(("lit.key",)), loc.line_of(("d",))) == (2, 3, 6)
    assert loc.line_of(("z",)) is None
    assert loc.line_count == 7


@pytest.mark.parametrize(
    "key",
    [
        '"po\\U00000072t"',
        '"po\\u0072t"',
        '"a\\tb\\nc\\bd\\fe\\rf"',
        '"q\\"k\\\\"',
        "'lit\\U00000072'",
        '"caf\\u00E9 \\U0001F600"',
    ],
)
def test_quoted_keys_are_read_with_every_toml_escape(key: str) -> None:
    """A key written with an escape JSON lacks (``\\U`` with 8 digits) was placed at its
    table's header."""
    text = f"[t]\na = 1\n\n{key} = 2\n"
    (name,) = tomllib.loads(text)["t"].keys() - {"a"}
    assert KeyLocator(text).line_of(("t", name)) == 4


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('a = """x \\""" y\n"""\nb = 1\n', 3),  # an escaped quote does not close it
        ('a = """x \\\\"""\nb = 1\n', 2),  # an escaped backslash, then the closing quotes
        ('a = """x""""\nb = 1\n', 2),  # the string's last character is a quote
    ],
    ids=["escaped-quote", "escaped-backslash", "quote-before-the-closing-quotes"],
)
def test_backslashes_before_the_quotes_of_a_multiline_string(text: str, line: int) -> None:
    assert tomllib.loads(text)["b"] == 1
    assert KeyLocator(text).line_of(("b",)) == line


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (
            ("services", "llm_control_plane", "instances", 1, "port"),
            "services.llm_control_plane.instances[1].port",
        ),
        (("gateway", "a.b", "c d"), 'gateway."a.b"."c d"'),
        ((), ""),
    ],
)
def test_format_key(path: tuple[str | int, ...], text: str) -> None:
    assert format_key(path) == text


def test_syntax_error_carries_file_and_line() -> None:
    text = "a = 1\n[gateway\nport = 1\n"
    with pytest.raises(tomllib.TOMLDecodeError) as info:
        tomllib.loads(text)
    error = syntax_error(info.value, "cfg.toml", text)
    assert error.location == "cfg.toml:2"
    assert "invalid TOML" in error.message
    assert "\n" not in str(error)


def test_syntax_error_at_end_of_document_points_at_last_line() -> None:
    text = 'a = 1\nb = "unterminated'
    with pytest.raises(tomllib.TOMLDecodeError) as info:
        tomllib.loads(text)
    assert syntax_error(info.value, "f.toml", text).location == "f.toml:2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[gateway]\nport = 1\n[gateway]\n",
            "table gateway is declared twice; write its keys under one header",
        ),
        ("[[a.b]]\nx = 1\n[a.b]\n", "table a.b is declared twice; write its keys under one header"),
        ("[gateway]\nport = 1\n  port = 2\n", "port is given a value twice; keep one"),
        ('x = 1\n"x" = 2\n', '"x" is given a value twice; keep one'),
        (
            "a = {b = 1}\na.c = 2\n",
            "a was written whole (an inline table or an array) and cannot be added to here; "
            "write all of it in one place",
        ),
        (
            "a = [1]\n[[a]]\n",
            "a was written whole (an inline table or an array) and cannot be added to here; "
            "write all of it in one place",
        ),
        ("a = 1\n[a]\n", "Cannot overwrite a value (column 3)"),  # no key on the line
        # tomllib names the table being added; the one written whole is its parent
        (
            "[s]\npd = { on = true }\n[s.pd.metadata]\n",
            "s.pd was written whole (an inline table or an array) and cannot be added to "
            "here; write all of it in one place",
        ),
        (  # an array of inline tables is a value too (not an array of tables)
            "a = [{b = 1}]\n[a.b]\n",
            "a was written whole (an inline table or an array) and cannot be added to here; "
            "write all of it in one place",
        ),
        (  # an array of tables: its last table is the one being written
            "[[s]]\nx = 1\n[[s]]\npd = { on = true }\n[s.pd.metadata]\n",
            "s.pd was written whole (an inline table or an array) and cannot be added to "
            "here; write all of it in one place",
        ),
        (  # its header's quoted key holds "]]"
            "[[s.'a]]b']]\npd = { on = true }\n[s.'a]]b'.pd.metadata]\n",
            's."a]]b".pd was written whole (an inline table or an array) and cannot be added '
            "to here; write all of it in one place",
        ),
        (
            "[s]\npd = { on = true }\npd.metadata.x = 1\n",
            "s.pd was written whole (an inline table or an array) and cannot be added to "
            "here; write all of it in one place",
        ),
    ],
)
def test_a_key_or_table_given_twice_is_said_in_the_files_words(text: str, message: str) -> None:
    with pytest.raises(tomllib.TOMLDecodeError) as info:
        tomllib.loads(text)
    error = syntax_error(info.value, "f.toml", text)
    last_line = text.count("\n")  # each case's mistake is on its last line
    assert (error.location, error.detail) == (f"f.toml:{last_line}", f"invalid TOML: {message}")


def test_problems_locate_and_sort_by_line() -> None:
    text = "[a]\nx = 1\n\n[b]\ny = 2\n"
    problems = Problems("f.toml", KeyLocator(text))
    problems.add(("b", "y"), "second")
    problems.add(("a", "x"), "first")
    problems.add(("a", "missing"), "third")
    ordered = problems.sorted()
    assert [str(e) for e in ordered] == [
        "f.toml:1: a.missing: third",
        "f.toml:2: a.x: first",
        "f.toml:5: b.y: second",
    ]
    assert problems.failed(("a", "x"))
    assert not problems.failed(("a",))


def test_problems_without_locator_use_source_only() -> None:
    problems = Problems("<dict>")
    problems.add(("gateway", "port"), "bad")
    assert problems.errors[0].location == "<dict>"
    assert problems.errors[0].key == "gateway.port"


def test_problems_keeps_every_message_about_a_key_once() -> None:
    problems = Problems("<dict>")
    for message in ("first", "second", "first"):
        problems.add(("gateway", "port"), message)
    assert [e.message for e in problems.errors] == [
        "<dict>: gateway.port: first",
        "<dict>: gateway.port: second",
    ]


def test_json_keys_are_located_at_their_lines() -> None:
    text = (
        '{\n  "a": 1,\n  "instances": [\n    {"role": "p", "tp": 2},\n    {\n'
        '      "tp": [1, {"x": "a,b}\\\\\\"]"}],\n      "gpu_ids": [0,\n        1]\n    }\n  ],\n'
        '  "z": {}\n}\n'
    )
    json.loads(text)  # valid JSON, with a string holding brackets, a comma and escapes
    locator = JsonKeyLocator(text)
    assert [
        locator.line_of(path)
        for path in (
            ("a",), ("instances",), ("instances", 0, "tp"), ("instances", 1),
            ("instances", 1, "tp", 1, "x"), ("instances", 1, "gpu_ids", 1), ("z",),
            ("z", "never", 3), ("nowhere",),
        )
    ] == [2, 3, 4, 5, 6, 8, 11, 11, None]  # fmt: skip


def test_an_integer_too_long_to_read_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        read_toml("[gateway]\nport = 1" + "0" * 5000 + "\n", "big.toml")
    assert err.value.location == "big.toml"
    assert "more than 4,300 digits" in err.value.message
