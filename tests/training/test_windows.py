import numpy as np
import pytest

from ahn_jax.training import windows as W


def test_ahn_random_sampler_follows_the_reference_rules():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        s = W.sample_ahn(rng, 24576)
        assert s.budget in (4096, 8192)  # L/8 < c < L  (AHN.md §3.3 example)
        assert s.sinks <= s.budget // 2 and s.sinks in W.AHN_SINKS
        seen.add((s.budget, s.sinks))
    assert len(seen) > 6
    budgets = {W.sample_ahn(rng, 2000).budget for _ in range(200)}
    assert budgets == {256, 512, 1024}


def test_sampler_is_reproducible_per_step_and_errors_are_clear():
    a = [W.sample_ahn(W.step_rng(7, s), 4096) for s in range(20)]
    b = [W.sample_ahn(W.step_rng(7, s), 4096) for s in range(20)]
    assert a == b
    with pytest.raises(ValueError, match="no window budget"):
        W.sample_ahn(np.random.default_rng(0), 30)
    assert W.sample_ahn(np.random.default_rng(0), 40, kind="fixed", fixed_window=16) == W.WindowSample(16, 0)


def test_allmem_sampler_keeps_chunk_within_window():
    rng = np.random.default_rng(1)
    for _ in range(200):
        s = W.sample_allmem(rng)
        assert s.chunk <= s.window
