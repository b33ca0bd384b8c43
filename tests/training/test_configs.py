"""Every shipped config loads, and the AHN configs carry the paper's recipe."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None)


@pytest.mark.parametrize("name,memory", [("qwen3b_gdn", "gated_deltanet"), ("qwen3b_dn", "deltanet"),
                                         ("qwen3b_mamba2", "mamba2"), ("qwen7b_gdn", "gated_deltanet"),
                                         ("qwen14b_gdn", "gated_deltanet"), ("qwen3_allmem", "ttt_mlp")])
def test_configs_load(name, memory, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    c = _load(name)
    assert c.ahn.memory == memory
    for key in ("model.path", "train.steps", "train.log_every", "ckpt.every"):
        section, field = key.split(".")
        assert field in c[section]
    from ahn_jax.training.loop import ahn_config_from

    assert ahn_config_from(c).memory == memory  # the model's AHNConfig validates (e.g. AllMem chunk <= window)
    if memory != "ttt_mlp":
        assert (c.train.lr, c.train.warmup_ratio, c.train.weight_decay, c.train.steps) == (1e-4, 0.1, 0.1, 740)
        assert c.data.cutoff_len == 24576 and c.data.filter_len == 288
