"""The seed's data types: what they show of themselves."""

from __future__ import annotations

import pytest

from sage_llm.types import ExecutionInstance, RequestPriority


def test_engine_api_key_never_appears_in_repr() -> None:
    inst = ExecutionInstance(
        instance_id="a", host="127.0.0.1", port=8000, model_name="m", api_key="sk-very-secret"
    )
    assert "sk-very-secret" not in repr(inst)
    assert "sk-very-secret" not in str(inst)
    assert inst.api_key == "sk-very-secret"


def test_a_priority_parses_from_a_member_a_number_or_a_name() -> None:
    assert RequestPriority.parse("high") is RequestPriority.HIGH
    assert RequestPriority.parse(" 3 ") is RequestPriority.LOW
    assert RequestPriority.parse(0) is RequestPriority.CRITICAL
    for bad in ("\u00b2", "\uff11", "-1", "5", True, "soon"):  # "²" is isdigit(), not int()
        with pytest.raises(ValueError, match="invalid priority"):
            RequestPriority.parse(bad)
