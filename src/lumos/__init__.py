"""lumos: see where a vision model looks."""
