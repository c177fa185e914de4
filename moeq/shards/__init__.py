"""The shards stage: the quant split for the Hub, or kept whole (stage.py)."""
