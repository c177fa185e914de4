"""The choice stage: which of a quant's candidate files is published, on measured KL divergence."""
