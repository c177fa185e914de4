"""The quantize stage: llama-quantize on the source, with its progress read per tensor (stage.py)."""
