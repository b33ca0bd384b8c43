"""`python -m ahn_jax.convert --ahn-in`: an AHN-only file is checked against the base dims, imported and written back
bit-exactly with the released names; a mismatching file is a clear error that leaves no output."""

import jax
import numpy as np
from flax import nnx

from ahn_jax import convert
from ahn_jax.hf.ahn_names import export_ahn_weights
from ahn_jax.hf.safetensors_io import list_tensors, read_tensor
from ahn_jax.models.config import QwenConfig
from ahn_jax.models.hybrid_config import AHNConfig, build_memory
from ahn_jax.models.memory.base import MemoryParam


def _released_like_file(base_dir, path, memory):
    config = QwenConfig.from_hf(base_dir)
    ahn = AHNConfig(memory=memory, window=1)
    rngs = nnx.Rngs(3)
    mems = {i: build_memory(ahn, config, i, rngs=rngs) for i in range(config.num_hidden_layers)}
    for m in mems.values():  # non-trivial values everywhere (o_proj starts at zero)
        state = nnx.state(m, MemoryParam)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(len(leaves)), len(leaves))
        nnx.update(m, jax.tree.unflatten(treedef, [x + jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    export_ahn_weights(path, mems, dtype="bfloat16")


def test_ahn_roundtrip_is_bit_exact_and_mismatch_is_an_error(hf_checkpoint, tmp_path, capsys):
    base, _ = hf_checkpoint("qwen2_tied_g2")
    src = tmp_path / "released.safetensors"
    _released_like_file(base, src, "gated_deltanet")
    out = tmp_path / "out.safetensors"
    assert convert.main(["--ahn-in", str(src), "--memory", "gated_deltanet", "--base", base, "--out", str(out),
                         "--dtype", "bfloat16"]) == 0
    names = list_tensors(str(src))
    assert names == list_tensors(str(out)) and all(".ahn.fn." in n for n in names)
    for n in names:
        a, b = read_tensor(str(src), n), read_tensor(str(out), n)
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint16), b.view(np.uint16)), n
    bad = tmp_path / "bad.safetensors"
    assert convert.main(["--ahn-in", str(src), "--memory", "deltanet", "--base", base, "--out", str(bad)]) == 1
    assert "unexpected tensor" in capsys.readouterr().err and not bad.exists()
