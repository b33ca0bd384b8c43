"""ahn_jax.hf"""
