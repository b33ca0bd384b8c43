"""ahn_jax.training"""
