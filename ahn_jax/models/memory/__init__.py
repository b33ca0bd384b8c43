"""ahn_jax.models.memory"""
