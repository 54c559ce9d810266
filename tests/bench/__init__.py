"""Tests of sage_llm.bench."""
