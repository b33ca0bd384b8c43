"""ahn_jax.data"""
