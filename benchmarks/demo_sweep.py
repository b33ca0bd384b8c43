"""Sweep of the CPU recall demo (issue 7): which memory / schedule / loss / init lets the memory recover the
teacher's beyond-window recall? Each variant is configs/tiny_gdn.py (get_config(memory)) with overrides, trained by
ahn_jax.training.loop.train (what `python -m ahn_jax.train` runs) in its own workdir under /tmp, and scored by
ahn_jax.training.demo_report.write_report (the demo's report). Writes $OUT/demo_sweep.json after every variant (a
timeout keeps what finished) and prints a table at the end.

    PYTHONPATH=$PWD python3 benchmarks/demo_sweep.py            # the GPU sweep (VARIANTS below)
    PYTHONPATH=$PWD python3 benchmarks/demo_sweep.py --smoke    # CPU check: 2 variants, 5 steps, 8 documents
    PYTHONPATH=$PWD python3 benchmarks/demo_sweep.py --only gdn_base,dn_base

Two knobs the main command does not have yet are applied here, outside the config, so the sweep can measure them first:
  answer_weight  the distillation loss weighs answer tokens by this factor (the batch's loss_mask becomes float
                 weights, training/pretrain.answer_weights; distill_loss takes a weighted mean over positions).
  decay_init     "slow": GDN / Mamba2 decay parameters start with A = 1 and dt spread log-uniformly over
                 [1e-4, 1e-2] across heads, i.e. per-token retention exp(g) in [0.99, 0.9999], instead of the spec's
                 init (GDN: A ~ U(0, 16), dt in [1e-3, 1e-1]; Mamba2: A = h + 1, dt_bias = 1), which forgets within a
                 few tokens while the demo's evidence lies 8..192 tokens back.
Per variant the JSON holds the report (beyond/within-window accuracy of teacher / window-only / memory, held-out KL),
wall time, mean step time after the first (compiled) step, and for decaying memories the learned per-head retention
over 100 tokens, exp(100 * mean g), measured on held-out documents at init and after training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name, memory ("gdn" | "dn" | "mamba2" | "allmem"), config overrides (dotted keys), extra knobs (module docstring).
SHORT = {"data.min_length": 96, "data.cutoff_len": 96, "data.buckets": (96,), "demo.length": 96,
         "data.tasks.distance": (24, 56), "demo.documents": 128}
SW = {"decay_init": "slow", "answer_weight": 10.0}  # the two cheap fixes together
VARIANTS = [  # in priority order: --budget-s skips the tail if the device is slower than estimated
    ("gdn_base", "gdn", {}, {}),
    ("gdn_slow_aw10", "gdn", {}, SW),
    ("dn_base", "dn", {}, {}),
    ("gdn_slow", "gdn", {}, {"decay_init": "slow"}),
    ("gdn_aw10", "gdn", {}, {"answer_weight": 10.0}),
    ("dn_aw10", "dn", {}, {"answer_weight": 10.0}),
    ("mamba2_base", "mamba2", {}, {}),
    ("allmem_base", "allmem", {}, {}),
    ("mamba2_slow_aw10", "mamba2", {}, SW),
    ("gdn_slow_aw10_layer1", "gdn", {"ahn.layers": (1,)}, SW),
    ("gdn_slow_aw10_lr1e-2", "gdn", {"train.lr": 1e-2}, SW),
    # capacity probe: 96-token documents, so the memory holds at most 60 tokens (vs 220) and few facts
    ("gdn_slow_aw10_short96", "gdn", SHORT, SW),
    ("dn_aw10_short96", "dn", SHORT, {"answer_weight": 10.0}),
    ("gdn_slow_aw10_1k", "gdn", {"train.steps": 1000}, SW),
    ("dn_aw10_1k", "dn", {"train.steps": 1000}, {"answer_weight": 10.0}),
    ("gdn_slow_aw10_recall_1k", "gdn", {"train.steps": 1000, "data.tasks.tasks": ("recall",)}, SW),
    ("allmem_aw10_1k", "allmem", {"train.steps": 1000}, {"answer_weight": 10.0}),
    ("mamba2_slow_aw10_1k", "mamba2", {"train.steps": 1000}, SW),
]
SMOKE = ["gdn_slow_aw10", "dn_base"]


def apply_overrides(cfg, overrides):
    """Set dotted keys ("train.steps") on an ml_collections config; an unknown key is an error naming it."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p] if isinstance(node, dict) else getattr(node, p)
        if isinstance(node, dict):
            if leaf not in node:
                raise KeyError(f"override {key!r}: no such config key")
            node[leaf] = value
        else:
            if leaf not in node:
                raise KeyError(f"override {key!r}: no such config key")
            setattr(node, leaf, value)
    return cfg


def slow_decay_init(model):
    """decay_init="slow" (module docstring) on every GDN / Mamba2 memory of `model`, in place."""
    import jax.numpy as jnp

    from ahn_jax.models.memory.base import inverse_softplus

    for mem in model.memories:
        if mem.kind not in ("gated_deltanet", "mamba2"):
            raise ValueError(f"decay_init='slow' applies to gated_deltanet / mamba2 memories, not {mem.kind!r}")
        h = mem.num_heads
        dt = jnp.exp(jnp.linspace(math.log(1e-4), math.log(1e-2), h, dtype=jnp.float32))
        mem.A_log[...] = jnp.zeros((h,), jnp.float32)
        mem.dt_bias[...] = inverse_softplus(dt)


def log_decay(mem, gates):
    """Per-token log decay g [B, n, Hq] (<= 0) of a GDN or Mamba2 memory from its write gates; None for others."""
    import jax
    import jax.numpy as jnp

    if mem.kind == "gated_deltanet":
        return gates["g"]
    if mem.kind == "mamba2":
        return -jnp.exp(mem.A_log[...]) * jax.nn.softplus(gates["dt"] + mem.dt_bias[...])
    return None


def decay_stats(model, documents, window, sinks):
    """{layer: [retention over 100 tokens per head]} = exp(100 * mean_j g_j) over the tokens each memory absorbs on
    `documents` (the student's own hidden states, so layer 2 sees layer 1's memory output). {} for DN / AllMem."""
    import jax.numpy as jnp
    import numpy as np

    from ahn_jax.models.attention import default_positions

    ids = jnp.asarray(np.stack([d["input_ids"] for d in documents]).astype(np.int32))
    positions = default_positions(*ids.shape)
    x = model.base.model.embed_tokens(ids)
    out = {}
    for i in range(model.config.num_hidden_layers):
        mem = model.memory_for(i)
        if mem is not None:
            u = model.base.model.layers[i].input_layernorm(x)
            g = log_decay(mem, mem.write_gates(u[:, sinks:]))
            if g is not None:
                out[str(i)] = [round(float(v), 4) for v in np.exp(100.0 * np.asarray(g).mean(axis=(0, 1)))]
        x = model.layer_forward(i, x, positions, teacher=False, window=window, sinks=sinks)
    return out


def output_scale(model):
    """{layer: Frobenius norm of the memory's o_proj} (zero at init; hypothesis: a large one hurts in-window tokens)."""
    import numpy as np

    return {str(layer): round(float(np.linalg.norm(np.asarray(mem.o_proj[...]))), 4)
            for layer, mem in model.memories_by_layer().items()}


def weighted_data_factory(factory, answer_weight):
    """Wrap a batch-iterator factory so that loss_mask weighs answer tokens by `answer_weight` (float32 weights)."""
    from ahn_jax.training.pretrain import answer_weights

    class Weighted:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            batch = dict(next(self.it))
            batch["loss_mask"] = answer_weights(batch, answer_weight)
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    return lambda: Weighted(factory())


def run_variant(name, memory, overrides, knobs, *, smoke, root, memory_impl="chunk"):
    from configs import tiny_gdn

    from ahn_jax.data import synthetic
    from ahn_jax.train import make_data_factory
    from ahn_jax.training import demo_report, loop

    cfg = tiny_gdn.get_config(memory)
    cfg.ckpt.every = 1 << 30  # only the final save (resume is tested elsewhere; saves cost sweep time)
    cfg.ahn.impl = memory_impl
    apply_overrides(cfg, overrides)
    if smoke:
        cfg.train.steps, cfg.train.log_every, cfg.demo.documents = 5, 5, 8
    unknown = set(knobs) - {"answer_weight", "decay_init"}
    if unknown:
        raise KeyError(f"variant {name!r}: unknown knobs {sorted(unknown)}")
    workdir = os.path.join(root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    factory = make_data_factory(cfg)
    if knobs.get("answer_weight", 1.0) != 1.0:
        factory = weighted_data_factory(factory, float(knobs["answer_weight"]))

    task_cfg = synthetic.TaskConfig(**dict(cfg.data.get("tasks") or {}))
    probe_docs = [synthetic.generate_document(cfg.demo.seed + 1, i, split="heldout", length=cfg.demo.length,
                                              config=task_cfg) for i in range(8)]
    W, S = int(cfg.window.fixed_window), int(cfg.window.fixed_sinks)
    built = {}
    original_build = loop.build_model

    def build(c):  # the loop's own builder, then the sweep's init knob; remembers the initial decay
        model = original_build(c)
        if knobs.get("decay_init") == "slow":
            slow_decay_init(model)
        elif knobs.get("decay_init") not in (None, "spec"):
            raise ValueError(f"variant {name!r}: decay_init must be 'spec' or 'slow', got {knobs['decay_init']!r}")
        built["decay_init"] = decay_stats(model, probe_docs, W, S)
        return model

    loop.build_model = build
    t0 = time.perf_counter()
    try:
        logged, model = loop.train(cfg, workdir, data_iter_factory=factory, progress=False)
    finally:
        loop.build_model = original_build
    train_s = time.perf_counter() - t0
    report = demo_report.write_report(cfg, model, workdir)
    wall_s = time.perf_counter() - t0
    return {
        "name": name, "memory": cfg.ahn.memory, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in overrides.items()},
        "knobs": knobs, "steps": int(cfg.train.steps), "lr": float(cfg.train.lr), "train_s": round(train_s, 1),
        "wall_s": round(wall_s, 1), "final_loss": logged[-1]["loss"] if logged else None, "report": report,
        "retention100_init": built.get("decay_init"), "retention100_trained": decay_stats(model, probe_docs, W, S),
        "o_proj_norm": output_scale(model),
    }


def memory_ceiling(documents=12, heads=None, teacher_dir=None):
    """What a linear memory reading the frozen attention's keys could retrieve at best (no training involved).

    For every beyond-window answer of the teacher in `teacher_dir` (an HF dir; default the shipped one), at the second layer's heads, with the teacher's own
    post-RoPE q/k/v (full-attention hidden states) and the tokens the memory holds (ops/window.memory_holds):
    the readout of (a) softmax attention over the held tokens (what the teacher does), (b) a delta rule (beta 0.5 or
    1) over all held tokens, (c) a delta rule that writes only the documents' evidence tokens (an oracle write gate),
    (d) plain linear attention. Score: is the readout nearer (cosine) to the evidence token's value than to every
    other held value? Returns {readout: {"nearest": fraction, "cos": mean cosine to the evidence value}}."""
    import jax.numpy as jnp
    import numpy as np

    from configs import tiny_gdn

    from ahn_jax.data import synthetic
    from ahn_jax.models.attention import default_positions
    from ahn_jax.models.loading import load_pretrained
    from ahn_jax.ops.window import memory_holds

    cfg = tiny_gdn.get_config("gdn")
    W, S = int(cfg.window.fixed_window), int(cfg.window.fixed_sinks)
    task = synthetic.TaskConfig(**dict(cfg.data.tasks))
    docs = [synthetic.generate_document(cfg.demo.seed, i, split="heldout", length=cfg.demo.length, config=task)
            for i in range(documents)]
    model = load_pretrained(teacher_dir or cfg.model.path, dtype="float32")
    ids = jnp.asarray(np.stack([d["input_ids"] for d in docs]))
    positions = default_positions(*ids.shape)
    x = model.model.embed_tokens(ids)
    last = len(model.model.layers) - 1
    for layer in model.model.layers[:last]:
        x = layer(x, positions)
    top = model.model.layers[last]
    q, k, v = (np.asarray(t, np.float64) for t in top.self_attn.project(top.input_layernorm(x), positions))
    dh = q.shape[-1]
    heads = range(q.shape[2]) if heads is None else heads
    group = q.shape[2] // k.shape[2]  # GQA: query head h reads KV head h // group (jax/HF repeat order)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    def delta_rule(keys, vals, beta):  # plain sequential delta rule, unit keys: M <- M + beta k (v - k M)
        state = np.zeros((dh, vals.shape[-1]))
        for kk, vv in zip(keys, vals):
            state = state + beta * np.outer(kk, vv - kk @ state)
        return state

    scores = {n: [] for n in ("softmax", "delta_b0.5", "delta_b1", "delta_evidence_only", "linear")}
    for b, d in enumerate(docs):
        ans, ev = d["answer_positions"], d["evidence_positions"]
        evidence_set = set(int(e) for e in ev)
        for a, e, far in zip(ans, ev, synthetic.evidence_beyond_window(ans, ev, W, S)):
            if not far:
                continue
            t = int(a) - 1
            held = np.nonzero(np.asarray(memory_holds(t, np.arange(t + 1), W, S)))[0]
            for h in heads:
                kh, vh, qh = k[b, held, h // group], v[b, held, h // group], q[b, t, h]
                target, others = vh[held == e][0], vh[held != e]
                logits = kh @ qh / np.sqrt(dh)
                p = np.exp(logits - logits.max())
                facts = np.array([int(j) in evidence_set for j in held])
                readouts = {"softmax": (p / p.sum()) @ vh, "linear": (unit(kh) @ unit(qh)) @ vh,
                            "delta_b0.5": delta_rule(unit(kh), vh, 0.5).T @ unit(qh),
                            "delta_b1": delta_rule(unit(kh), vh, 1.0).T @ unit(qh),
                            "delta_evidence_only": delta_rule(unit(kh[facts]), vh[facts], 1.0).T @ unit(qh)}
                for n, o in readouts.items():
                    c = o @ target / (np.linalg.norm(o) * np.linalg.norm(target) + 1e-12)
                    c_other = others @ o / (np.linalg.norm(others, axis=-1) * np.linalg.norm(o) + 1e-12)
                    scores[n].append((c, float(c > c_other.max())))
    return {n: {"nearest": float(np.mean([s[1] for s in r])), "cos": float(np.mean([s[0] for s in r])),
                "n": len(r)} for n, r in scores.items()}


def format_row(r):
    rep = r["report"]
    acc, within, kl = rep["beyond_window_accuracy"], rep["within_window_accuracy"], rep["heldout_kl"]
    ret = r["retention100_trained"]
    ret_s = ";".join(f"L{k}:" + ",".join(f"{v:.2f}" for v in vs) for k, vs in ret.items()) if ret else "-"
    return (f"{r['name']:<26}{r['steps']:>6}{r['lr']:>8.0e}{r['wall_s']:>8.0f}"
            f"{acc['teacher']:>7.3f}{acc['window_only']:>7.3f}{acc['memory']:>7.3f}"
            f"{within['window_only']:>7.3f}{within['memory']:>7.3f}"
            f"{kl['window_only']:>7.3f}{kl['memory']:>7.3f}{rep['gap_closed']:>6.2f}  {ret_s}")


HEADER = (f"{'variant':<26}{'steps':>6}{'lr':>8}{'wall s':>8}"
          f"{'T>W':>7}{'win>W':>7}{'mem>W':>7}{'win<W':>7}{'mem<W':>7}{'KLwin':>7}{'KLmem':>7}{'gap':>6}"
          "  retention over 100 tokens per head (trained)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="2 variants, 5 steps, 8 documents (a CPU check)")
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--root", default="/tmp/demo_sweep", help="parent of the per-variant workdirs")
    p.add_argument("--budget-s", type=float, default=380.0,
                   help="start no new variant after this many seconds (the rest are listed as skipped)")
    p.add_argument("--memory-impl", default="chunk",
                   help="ahn.impl of every variant; default the pure-JAX chunked ops, the CPU demo's numerics "
                        "(the GPU Pallas kernels are not validated at the tiny head_dim 16)")
    p.add_argument("--ceiling", action="store_true",
                   help="only the no-training retrieval ceiling of linear memories (memory_ceiling) -> "
                        "$OUT/demo_memory_ceiling.json")
    p.add_argument("--heads", default="", help="with --ceiling: comma-separated heads of the last layer (all)")
    args = p.parse_args()
    if args.ceiling:
        heads = [int(h) for h in args.heads.split(",") if h.strip()] or None
        res = memory_ceiling(heads=heads)
        out_dir = os.environ.get("OUT", ".")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "demo_memory_ceiling.json"), "w") as f:
            json.dump(res, f, indent=2)
        for n, r in res.items():
            print(f"{n:<22} evidence value nearest: {r['nearest']:.3f}   cos to it: {r['cos']:.3f}   (n={r['n']})")
        return
    by_name = {v[0]: v for v in VARIANTS}
    names = SMOKE if args.smoke else [v[0] for v in VARIANTS]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"--only: unknown variants {missing}; known: {sorted(by_name)}")
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    import jax

    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": args.smoke,
               "memory_impl": args.memory_impl, "variants": []}
    out_path = os.path.join(out_dir, "demo_sweep.json")
    t_all = time.perf_counter()
    results["skipped"] = []
    for n in names:
        if time.perf_counter() - t_all > args.budget_s:
            results["skipped"].append(n)
            print(f"=== {n}: skipped (over --budget-s {args.budget_s})", flush=True)
            continue
        _, memory, overrides, knobs = by_name[n]
        print(f"=== {n}: memory {memory}, overrides {overrides}, knobs {knobs}", flush=True)
        r = run_variant(n, memory, overrides, knobs, smoke=args.smoke, root=args.root,
                        memory_impl=args.memory_impl)
        results["variants"].append(r)
        results["total_s"] = round(time.perf_counter() - t_all, 1)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, out_path)
        print(f"--- {n}: {r['wall_s']} s; beyond-window acc {r['report']['beyond_window_accuracy']}", flush=True)
    table = "\n".join([HEADER] + [format_row(r) for r in results["variants"]])
    print("\n" + table)
    if results["skipped"]:
        print(f"skipped (budget): {', '.join(results['skipped'])}")
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    print(f"total {results['total_s']} s on {results['device']}; JSON: {out_path}")
    with open(os.path.join(out_dir, "demo_sweep.txt"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
