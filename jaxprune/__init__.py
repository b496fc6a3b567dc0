"""jaxprune: prune and sparsely train LLaMA-family models in JAX."""

__version__ = "0.1.0"
