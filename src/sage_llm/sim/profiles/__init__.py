"""Fitted step-time profiles of real engines (JSON); see sage_llm.bench.fidelity."""
