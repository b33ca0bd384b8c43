"""ahn_jax.eval"""
