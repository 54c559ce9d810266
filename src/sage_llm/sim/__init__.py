"""sage_llm.sim."""
