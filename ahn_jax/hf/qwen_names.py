"""HF tensor names <-> ahn_jax parameter paths for Qwen2 / Qwen2.5 / Qwen3, declared once, plus the strict assignment.

HF Linear weights are [out, in]; our kernels are [in, out] ("T" rule). Everything else is copied as is.
The assignment consumes every file tensor exactly once and fills every parameter exactly once; anything else (a
missing tensor, an unexpected one, a wrong shape, an `lm_head.weight` in a tied checkpoint) is an error naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np

from ahn_jax.models.config import QwenConfig

# (HF name template, our path template, transpose, condition on the config). {i} is the layer index.
_GLOBAL = (
    ("model.embed_tokens.weight", "model.embed_tokens.embedding", False, None),
    ("model.norm.weight", "model.norm.weight", False, None),
    ("lm_head.weight", "lm_head.kernel", True, lambda c: not c.tie_word_embeddings),
)
_PER_LAYER = (
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", False, None),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", False,
     None),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.kernel", True, None),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.kernel", True, None),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.kernel", True, None),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.kernel", True, None),
    ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias", False,
     lambda c: c.attention_bias),
    ("model.layers.{i}.self_attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias", False,
     lambda c: c.attention_bias),
    ("model.layers.{i}.self_attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias", False,
     lambda c: c.attention_bias),
    ("model.layers.{i}.self_attn.o_proj.bias", "model.layers.{i}.self_attn.o_proj.bias", False,
     lambda c: c.o_proj_bias),
    ("model.layers.{i}.self_attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight", False,
     lambda c: c.qk_norm),
    ("model.layers.{i}.self_attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight", False,
     lambda c: c.qk_norm),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.kernel", True, None),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.kernel", True, None),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.kernel", True, None),
)


@dataclasses.dataclass(frozen=True)
class NameRule:
    hf_name: str
    path: str  # dotted ahn_jax parameter path, e.g. "model.layers.0.self_attn.q_proj.kernel"
    transpose: bool

    def to_ours(self, hf_tensor: np.ndarray) -> np.ndarray:
        return hf_tensor.T if self.transpose else hf_tensor

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.T if self.transpose else ours


def name_map(config: QwenConfig) -> dict[str, NameRule]:
    """{HF tensor name: rule} for every parameter of a model with this config."""
    rules = {}
    for hf, ours, transpose, cond in _GLOBAL:
        if cond is None or cond(config):
            rules[hf] = NameRule(hf, ours, transpose)
    for i in range(config.num_hidden_layers):
        for hf, ours, transpose, cond in _PER_LAYER:
            if cond is None or cond(config):
                rules[hf.format(i=i)] = NameRule(hf.format(i=i), ours.format(i=i), transpose)
    return rules


def path_str(keypath) -> str:
    """jax key path of an nnx State leaf -> dotted parameter path (drops the Variable's trailing `.value`)."""
    parts = []
    for entry in keypath:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name != "value":
                parts.append(entry.name)
        else:
            parts.append(str(getattr(entry, "key", entry)))
    return ".".join(parts)


def flat_params(state) -> tuple[dict[str, object], Callable[[dict[str, object]], object]]:
    """nnx State -> ({dotted path: leaf}, rebuild) where rebuild({path: new leaf}) gives the same-structure State."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [path_str(kp) for kp, _ in leaves]
    if len(set(paths)) != len(paths):
        raise RuntimeError("duplicate parameter paths in model state")

    def rebuild(new: dict[str, object]):
        return jax.tree_util.tree_unflatten(treedef, [new[p] for p in paths])

    return {p: leaf for p, (_, leaf) in zip(paths, leaves)}, rebuild


def check_checkpoint(config: QwenConfig, file_tensors: dict[str, tuple[tuple[int, ...], object]],
                     param_shapes: dict[str, tuple[int, ...]], source: str,
                     read: Callable[[str], np.ndarray] | None = None) -> dict[str, NameRule]:
    """Validate names and shapes of a checkpoint before reading parameter data; returns the rules to apply.

    file_tensors: {HF name: (shape, dtype)}; param_shapes: {our path: shape}. Raises ValueError naming the tensor.
    `read` is only used to check that a tied checkpoint's stored lm_head.weight equals the embedding table.
    """
    rules = name_map(config)
    ours = {r.path for r in rules.values()}
    if ours != set(param_shapes):  # the map and the module tree disagree: a bug here, not in the user's file
        raise RuntimeError(f"name map out of sync with the model: only in map {sorted(ours - set(param_shapes))[:5]}, "
                           f"only in model {sorted(set(param_shapes) - ours)[:5]}")
    if config.tie_word_embeddings and "lm_head.weight" in file_tensors:
        # Some releases (e.g. Qwen3-0.6B/1.7B) store a copy of the tied table; a bit-identical copy is consumed, any
        # other lm_head is a disagreement we refuse to resolve by guessing (pitfall 3).
        same = (read is not None and "model.embed_tokens.weight" in file_tensors
                and tuple(file_tensors["lm_head.weight"][0]) == tuple(file_tensors["model.embed_tokens.weight"][0])
                and np.array_equal(read("lm_head.weight"), read("model.embed_tokens.weight")))
        if not same:
            raise ValueError(f"{source}: config.json says tie_word_embeddings=true but the checkpoint has a tensor "
                             f"'lm_head.weight' that differs from 'model.embed_tokens.weight'; refusing to guess which "
                             f"one is right (fix tie_word_embeddings in config.json or the file)")
        file_tensors = {k: v for k, v in file_tensors.items() if k != "lm_head.weight"}
    missing = sorted(set(rules) - set(file_tensors))
    if missing:
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = " (config.json says tie_word_embeddings=false; is the checkpoint tied?)"
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{'...' if len(missing) > 8 else ''}{hint}")
    extra = sorted(set(file_tensors) - set(rules))
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:8]}{'...' if len(extra) > 8 else ''} not used by a "
                         f"{config.model_type} model with this config.json")
    for name, rule in rules.items():
        shape = tuple(file_tensors[name][0])
        want = tuple(param_shapes[rule.path])
        want_hf = want[::-1] if rule.transpose else want
        if shape != want_hf:
            raise ValueError(f"{source}: tensor {name!r} has shape {shape}, expected {want_hf} from config.json")
    return rules


def assign(config: QwenConfig, file_tensors: dict[str, tuple[tuple[int, ...], object]],
           read: Callable[[str], np.ndarray], state, convert: Callable[[str, np.ndarray, object], object],
           source: str, progress: Callable[[Iterator], Iterator] = iter):
    """Fill an (abstract) nnx State from checkpoint tensors, one at a time.

    read(hf_name) -> numpy array; convert(path, numpy in our layout, target leaf) -> the new leaf (e.g. a jax array in
    the leaf's dtype). Returns the filled State. Every file tensor is consumed and every parameter assigned once.
    """
    leaves, rebuild = flat_params(state)
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves.items()}
    rules = check_checkpoint(config, file_tensors, shapes, source, read)
    filled: dict[str, object] = {}
    for name in progress(sorted(rules)):
        rule = rules[name]
        if rule.path in filled:
            raise RuntimeError(f"parameter {rule.path} assigned twice (from {name})")
        filled[rule.path] = convert(rule.path, rule.to_ours(read(name)), leaves[rule.path])
    unassigned = sorted(set(leaves) - set(filled))
    if unassigned:
        raise RuntimeError(f"parameters never assigned: {unassigned[:8]}")
    return rebuild(filled)


def export_tensors(config: QwenConfig, state) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF name, thunk giving the HF-layout numpy array) for every parameter, so callers can stream them."""
    leaves, _ = flat_params(state)
    for name, rule in name_map(config).items():
        leaf = leaves[rule.path]
        yield name, (lambda leaf=leaf, rule=rule: rule.to_hf(np.asarray(leaf)))
