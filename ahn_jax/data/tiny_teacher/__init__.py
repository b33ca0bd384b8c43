"""Data-only package: the shipped tiny teacher (a package so wheels include its config, weights and tokenizer)."""
