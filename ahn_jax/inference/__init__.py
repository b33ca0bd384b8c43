"""ahn_jax.inference"""
