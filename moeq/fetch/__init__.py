"""The fetch stage: the F16 GGUF every quant is made from (stage.py declares it; hub_source.py downloads it)."""
