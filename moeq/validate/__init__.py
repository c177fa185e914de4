"""Validate stage: GGUF checks (structure, types, numerics) and the memory plan (issue 4)."""
