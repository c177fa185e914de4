"""The bench stage: speed, offload memory and quality loss, measured with llama.cpp's own tools (stage.py)."""
