"""The seed's data types: what they show of themselves."""

from __future__ import annotations

from sage_llm.types import ExecutionInstance


def test_engine_api_key_never_appears_in_repr() -> None:
    inst = ExecutionInstance(
        instance_id="a", host="127.0.0.1", port=8000, model_name="m", api_key="sk-very-secret"
    )
    assert "sk-very-secret" not in repr(inst)
    assert "sk-very-secret" not in str(inst)
    assert inst.api_key == "sk-very-secret"
