import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("memory", ["gated_deltanet", "ttt_mlp"])
def test_export_memory_writes_ahn_names_or_skips_allmem(memory, tmp_path):
    """The end of a training run exports the memory with the released AHN names; AllMem (ttt_mlp) has none, so the
    export is skipped with a warning instead of failing the finished run (it used to raise from ahn_names)."""
    from flax import nnx

    from ahn_jax.hf.safetensors_io import list_tensors
    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.hybrid import HybridQwenForCausalLM
    from ahn_jax.models.hybrid_config import AHNConfig
    from ahn_jax.models.qwen import QwenForCausalLM
    from ahn_jax.training.loop import export_memory

    cfg = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 64,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}
    base = QwenForCausalLM(QwenConfig.from_hf(cfg), dtype="float32", rngs=nnx.Rngs(0))
    model = HybridQwenForCausalLM(base, AHNConfig(memory=memory, window=4, sinks=1), rngs=nnx.Rngs(1))
    path = tmp_path / "ahn.safetensors"
    written = export_memory(model, str(path))
    assert written == (memory != "ttt_mlp") == path.exists()
    if written:
        assert any("o_proj" in name for name in list_tensors(str(path)))
