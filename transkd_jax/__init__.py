"""transkd-jax: TransKD (arXiv 2202.13393) in JAX/Flax."""

__version__ = "0.1.0"
