"""sage_llm.service."""
