import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from ahn_jax.training.checkpointing import Checkpointer, StopFlag, abstract_like


def test_save_restore_roundtrip_keeps_n_and_restores_shardings(tmp_path):
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(3)}
    ck = Checkpointer(tmp_path / "ck", keep=2, every=1, async_save=True)
    for s in (1, 2, 3):
        st = jax.tree.map(lambda x: x + s, state)
        assert ck.save(s, st, data_state=b"\x00grain-state", config={"lr": 0.1})
    ck.wait()
    assert ck.latest_step() == 3
    assert sorted(int(p) for p in os.listdir(tmp_path / "ck") if p.isdigit()) == [2, 3]
    restored, data_state, cfg = ck.restore(abstract_like(state))
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(6.0).reshape(2, 3) + 3)
    assert data_state == b"\x00grain-state" and cfg == {"lr": 0.1}
    ck.close()


def test_sigterm_sets_the_stop_flag():
    flag = StopFlag()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested
    finally:
        flag.restore_handlers()
