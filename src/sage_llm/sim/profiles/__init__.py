"""Fitted step-time profiles of real engines (JSON), read by sage_llm.bench.fidelity.load_profile."""
