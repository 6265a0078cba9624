"""Native kernels for hot paths that PyTorch ops cannot do well (each with a PyTorch fallback)."""
