"""sage_llm.control_plane.routing."""
