"""Pallas kernels (GPU and TPU). Imports only jax and numpy; each kernel matches an ahn_jax.ops reference, forward and VJP."""
