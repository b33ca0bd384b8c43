"""Data-only package: the shipped tiny tokenizer files (a package so wheels include its *.json files)."""
