"""Random window / sink / chunk samplers for training (AHN.md §3.3, ALLMEM.md §4.2 and §4.4).

Samples are drawn on the host with a numpy Generator seeded per step (so a resumed run draws the same values) and
passed to the jitted step as int32 scalars: attention masks use them as traced values, so nothing recompiles per step.
Returned windows follow ahn_jax's single convention (ops/window.py): `window` is the pure window and `sinks` the sink
count; the reference code's training "budget" is their sum.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The reference code's candidate lists (AHN.md §3.3).
AHN_BUDGETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
AHN_SINKS = (0, 32, 64, 128, 512, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class WindowSample:
    window: int
    sinks: int
    chunk: int = 0  # AllMem memory chunk (0 when unused)

    @property
    def budget(self) -> int:
        return self.window + self.sinks


def step_rng(seed: int, step: int) -> np.random.Generator:
    """A Generator that depends only on (seed, step): resuming at `step` reproduces the same draws."""
    return np.random.default_rng([seed, step])


def sample_ahn(rng: np.random.Generator, seq_len: int, *, kind: str = "random", sink_kind: str = "random",
               fixed_window: int = 256, fixed_sinks: int = 0, budgets=AHN_BUDGETS, sinks=AHN_SINKS) -> WindowSample:
    """AHN's sampler. kind: "random" (budget ~ U{c : L/8 < c < L}) or "fixed" (budget = fixed_window + sinks).
    sink_kind: "random" (S ~ U{c : c <= budget/2}), "fixed" (fixed_sinks) or "prefix" (0, the reference's default)."""
    if kind == "random":
        choices = [c for c in budgets if seq_len / 8 < c < seq_len]
        if not choices:
            raise ValueError(f"no window budget in {budgets} satisfies L/8 < c < L for L={seq_len}; "
                             "use longer sequences (filter_len) or the 'fixed' window")
        budget = int(rng.choice(choices))
        if sink_kind == "random":
            s = int(rng.choice([c for c in sinks if c <= budget // 2]))
        elif sink_kind == "fixed":
            s = fixed_sinks
        elif sink_kind == "prefix":
            s = 0
        else:
            raise ValueError(f"unknown sink_kind {sink_kind!r}")
        if s >= budget:
            raise ValueError(f"sinks {s} >= window budget {budget}")
        return WindowSample(window=budget - s, sinks=s)
    if kind == "fixed":
        s = fixed_sinks if sink_kind == "fixed" else 0
        return WindowSample(window=fixed_window, sinks=s)
    raise ValueError(f"unknown window kind {kind!r} (random | fixed)")


def sample_allmem(rng: np.random.Generator, *, windows=(512, 1024, 2048, 4096, 8192), sinks=(0, 64, 128, 256),
                  chunks=(512, 1024, 2048, 4096)) -> WindowSample:
    """AllMem's sampler (ALLMEM.md §4.4, our [I] default): powers of two, resampling until chunk <= window (no blind
    spot between the window and the memory, §4.2). Here `window` is the pure window (sinks excluded)."""
    for _ in range(1000):
        w, s, c = int(rng.choice(windows)), int(rng.choice(sinks)), int(rng.choice(chunks))
        if c <= w:
            return WindowSample(window=w, sinks=s, chunk=c)
    raise ValueError(f"no (window, chunk) pair with chunk <= window in {windows} x {chunks}")
