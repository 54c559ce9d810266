"""sage_llm.engines."""
