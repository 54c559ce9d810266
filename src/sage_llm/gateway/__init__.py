"""sage_llm.gateway."""
