"""Fixture writing tiny random transformers Qwen checkpoints (helpers live in hf_tiny.py)."""

import pytest
from hf_tiny import VARIANTS, make_hf_model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: variant name (or family + overrides) -> (directory, transformers model)."""

    def make(variant=None, family=None, **overrides):
        if variant is not None:
            family, base = VARIANTS[variant]
            overrides = {**base, **overrides}
        model = make_hf_model(family, **overrides)
        path = tmp_path / (variant or family)
        model.save_pretrained(str(path))
        return str(path), model

    return make
