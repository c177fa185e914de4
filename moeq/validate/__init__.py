"""The validate stage: GGUF checks (structure, types, numerics) and the memory plan (stage.py)."""
