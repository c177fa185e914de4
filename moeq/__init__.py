"""moeq: quantize Mixture-of-Experts models to GGUF and publish them with truthful model cards."""

__version__ = "0.1.0"
