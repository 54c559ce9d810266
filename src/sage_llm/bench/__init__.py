"""sage_llm.bench."""
