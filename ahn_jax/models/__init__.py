"""ahn_jax.models"""
