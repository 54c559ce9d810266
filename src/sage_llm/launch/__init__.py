"""sage_llm.launch."""
