"""The window/sink/memory sets partition the past of every query (spec/AHN.md §1.4)."""

import numpy as np
import pytest

from ahn_jax.ops import window as win


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 0), (4, 2), (7, 5), (20, 3)])
def test_attention_and_memory_partition_the_past(window, sinks):
    T = 24
    t = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    att = np.asarray(win.attention_visible(t, j, window, sinks))
    mem = np.asarray(win.memory_holds(t, j, window, sinks))
    assert not (att & mem).any()
    np.testing.assert_array_equal(att | mem, j <= t)
    # memory step i absorbs token sinks+i and is first read at sinks+window+i
    for i in range(T - sinks - window):
        q = win.first_memory_query(window, sinks) + i
        assert mem[q, sinks + i] and not mem[q - 1, sinks + i]
    assert int(win.memory_length(T, window, sinks)) == max(T - sinks - window, 0)
