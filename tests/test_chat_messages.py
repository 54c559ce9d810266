"""The chat message rule: roles, content, content parts and names."""

from __future__ import annotations

import pytest

from sage_llm.chat_messages import CONTENT_REQUIRED_ROLES, is_content_part, message_problem


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool", "assistant"])
def test_content_left_out_is_taken(role: str) -> None:
    assert message_problem({"role": role}) is None


@pytest.mark.parametrize("role", sorted(CONTENT_REQUIRED_ROLES))
def test_null_content_is_refused_in_the_roles_that_need_content(role: str) -> None:
    problem = message_problem({"role": role, "content": None, "tool_call_id": "c"})
    assert problem is not None and problem[0] == ".content"


def test_a_tool_message_needs_its_content_and_an_assistant_one_does_not() -> None:
    assert "tool" in CONTENT_REQUIRED_ROLES
    problem = message_problem({"role": "tool", "content": None, "tool_call_id": "c"})
    assert problem is not None and problem[0] == ".content"
    assert message_problem({"role": "assistant", "content": None, "tool_calls": []}) is None


def test_a_typeless_part_needs_one_of_its_fields_not_null() -> None:
    assert is_content_part({"image_url": {"url": "http://x/a.png"}})
    assert not is_content_part({"image_url": None})
    assert not is_content_part({"image_url": None, "audio_url": None})
    problem = message_problem({"role": "user", "content": [{"image_url": None}]})
    assert problem is not None and problem[0] == ".content[0]"


@pytest.mark.parametrize("name", [0, False, "", None, "bob"])
def test_a_name_is_a_string_or_null(name: object) -> None:
    problem = message_problem({"role": "user", "content": "x", "name": name})
    if isinstance(name, str) or name is None:
        assert problem is None
    else:
        assert problem == (".name", "must be a string")
