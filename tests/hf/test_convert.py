"""convert round trip: HF -> Orbax -> load_pretrained, and Orbax -> --to-hf back to identical tensors."""

import json
import os

import jax.numpy as jnp
import numpy as np
from hf_tiny import random_ids

from ahn_jax import convert, load_pretrained
from ahn_jax.hf.safetensors_io import list_tensors, read_tensor


def test_round_trip(hf_checkpoint, tmp_path):
    import transformers

    path, hf_model = hf_checkpoint("qwen3_tied_g4_hd24")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 4096}, f)
    orbax_dir = str(tmp_path / "orbax")
    assert convert.main(["--hf", path, "--out", orbax_dir, "--dtype", "float32"]) == 0
    assert os.path.isfile(os.path.join(orbax_dir, "tokenizer_config.json"))
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no temp dirs left

    ids = jnp.asarray(random_ids(1, 48, seed=2))
    from_hf = np.asarray(load_pretrained(path, dtype="float32")(ids))
    from_orbax = load_pretrained(orbax_dir, dtype="float32")
    np.testing.assert_array_equal(np.asarray(from_orbax(ids)), from_hf)
    assert load_pretrained(orbax_dir).model.norm.weight[...].dtype == jnp.bfloat16  # restored into the asked dtype

    back = str(tmp_path / "back")
    assert convert.main(["--to-hf", "--orbax", orbax_dir, "--out", back, "--max-shard-gb", "0.00005"]) == 0
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))  # small shard limit -> sharded
    assert os.path.isfile(os.path.join(back, "tokenizer_config.json"))
    original = list_tensors(path)
    assert list_tensors(back).keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(read_tensor(back, name), read_tensor(path, name), err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    for name, p in hf_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_help_mentions_both_directions(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--to-hf" in text and "--hf" in text and "safetensors" in text
