"""Do wider attention heads let the demo's memory recover beyond-window recall? (issue 7)

Hypothesis under test: the GDN memory of the CPU demo cannot recover recall beyond the window because the shipped
teacher's heads are 16-dim (a delta rule over its frozen keys finds the evidence 9 % of the time, softmax 68 %:
demo_sweep.memory_ceiling). Per teacher variant (TEACHERS, priority order) this script:
  1. pretrains the teacher with the project's own code path (training/pretrain.pretrain, what
     `python -m ahn_jax.train --config=configs/tiny_teacher.py` runs) into ROOT/<name>/, config = tiny_teacher's with
     the variant's architecture and training overrides;
  2. records its held-out answer accuracy (teacher_eval.json, written by pretrain) and when it left the recall
     plateau (first logged update whose training-batch answer accuracy >= 0.3);
  3. measures the retrieval ceiling on its last layer's frozen q/k/v (demo_sweep.memory_ceiling);
  4. if it left the plateau (held-out beyond-window accuracy > --distil-above), distils a GDN memory into it twice:
     the demo recipe (configs/tiny_gdn.py, 200 steps) and the sweep's best (slow decay init + answer weight 10,
     1000 steps), through demo_sweep.run_variant (loop.train + demo_report), with model.path = its HF export.
Writes $OUT/teacher_sweep.json after every variant (a timeout keeps what finished) and prints a table at the end.

    PYTHONPATH=$PWD python3 benchmarks/teacher_sweep.py              # the GPU sweep (one H100, < 9 minutes)
    PYTHONPATH=$PWD python3 benchmarks/teacher_sweep.py --smoke      # CPU check: 2 tiny variants end to end
    PYTHONPATH=$PWD python3 benchmarks/teacher_sweep.py --only w128_h2x64

Training data: the synthetic stream is generated in Python at ~1.3 ms per 256-token document on one core, i.e.
~40 ms per batch of 32: it, not the GPU (~3 ms per step for these models), would bound the pretraining. So the
documents come from the project's own pipeline (ahn_jax.train.make_data_factory, the teacher config's data section)
run ONCE in --workers spawned CPU processes, each with its own data.shuffle_seed (disjoint streams), into a pool of
batches of 8 that every variant replays in the same order (batch 32 = 4 pooled batches side by side), cycling when a
run needs more documents than the pool holds (documents are random facts: repeats cannot be memorised usefully).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# The parent keeps the GPU only as far as it uses it: the distillations run in child processes (run_distil).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import demo_sweep  # noqa: E402  (apply_overrides, run_variant, memory_ceiling, SW, format_row, HEADER)


def arch(hidden, heads, head_dim, kv=None):
    """config.json fields of a 2-layer Qwen2 teacher (tiny_teacher.TEACHER_ARCH otherwise), intermediate 2 x hidden."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": heads,
            "num_key_value_heads": heads if kv is None else kv, "head_dim": head_dim}


B32 = {"train.batch_size": 32}
# name, architecture (arch()), training overrides of configs/tiny_teacher.py (dotted keys). Priority order: the
# --budget-s check skips the tail. 12k updates of 32 = 8x the shipped teacher's documents (it left the plateau at
# ~2900 updates of 8); a last control re-trains the shipped 4 x 16 architecture with the same recipe.
TEACHERS = [
    ("w128_h2x64", arch(128, 2, 64), {**B32, "train.steps": 12000}),
    ("w128_h4x32", arch(128, 4, 32), {**B32, "train.steps": 12000}),
    ("w96_h2x48", arch(96, 2, 48), {**B32, "train.steps": 12000}),
    ("w128_h2x64_lr1e-3", arch(128, 2, 64), {**B32, "train.steps": 12000, "train.lr": 1e-3}),
    ("w128_h2x64_seed1", arch(128, 2, 64), {**B32, "train.steps": 12000, "train.seed": 1}),
    ("w64_h4x16_control", arch(64, 4, 16), {**B32, "train.steps": 12000}),
    ("w128_h2x64_20k", arch(128, 2, 64), {**B32, "train.steps": 20000}),
]
SMOKE = {"names": ["w128_h2x64", "w64_h4x16_control"], "steps": 12, "log_every": 4, "pool_batches": 24}
PLATEAU_ACC = 0.3  # training-batch answer accuracy that marks "left the recall plateau" (chance is ~0.04)
DISTIL = [  # (suffix, memory, overrides besides model.path, knobs): the demo recipe and the sweep's best variant
    ("gdn", "gdn", {}, {}),
    ("gdn_slow_aw10_1k", "gdn", {"train.steps": 1000}, demo_sweep.SW),
]


def teacher_config(arch_fields, overrides, *, smoke):
    """configs/tiny_teacher.py's config with the architecture fields and dotted overrides applied."""
    from configs import tiny_teacher

    cfg = tiny_teacher.get_config()
    fields = dict(cfg.model.random_init)
    unknown = set(arch_fields) - set(fields)
    if unknown:
        raise KeyError(f"teacher architecture: unknown config.json fields {sorted(unknown)}")
    fields.update(arch_fields)
    cfg.model.random_init = fields
    demo_sweep.apply_overrides(cfg, overrides)
    if smoke:
        cfg.train.steps, cfg.train.log_every = SMOKE["steps"], SMOKE["log_every"]
    return cfg


# --- the document pool ---------------------------------------------------------------------------------------------
def _pool_worker(seed, n, path):
    """Runs in a child process: `n` batches of 8 from the teacher config's pipeline with data.shuffle_seed = seed,
    pickled to `path`."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # the pipeline asks jax for the process count: keep it off the GPU
    import pickle

    from configs import tiny_teacher

    from ahn_jax.train import make_data_factory

    cfg = tiny_teacher.get_config()
    cfg.train.batch_size = 8
    cfg.data.shuffle_seed = seed
    it = make_data_factory(cfg)()
    batches = [dict(next(it)) for _ in range(n)]
    with open(path + ".tmp", "wb") as f:
        pickle.dump(batches, f)
    os.replace(path + ".tmp", path)


def make_pool(n_batches, workers, base_seed=1000):
    """n_batches batches of 8 documents (numpy dicts from the project's pipeline), generated by `workers` child
    processes over disjoint seeds. Plain subprocesses, not multiprocessing: after a multiprocessing pool this
    process's later distillation stalled on CPU (measured, twice; cause not found), and no fork after JAX started."""
    import pickle
    import subprocess
    import tempfile

    workers = max(1, min(workers, n_batches))
    per = [n_batches // workers + (i < n_batches % workers) for i in range(workers)]
    tmp = tempfile.mkdtemp(prefix="teacher_pool_")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    procs, paths = [], []
    for i, n in enumerate(per):
        if n:
            path = os.path.join(tmp, f"pool_{i}.pkl")
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--pool-worker",
                                           str(base_seed + i), str(n), path], env=env))
            paths.append(path)
    for proc in procs:
        if proc.wait():
            raise RuntimeError(f"pool worker {proc.args} failed with exit code {proc.returncode}")
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.extend(pickle.load(f))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pad_cols(a, width):
    import numpy as np

    return a if a.shape[1] == width else np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1)


def replay_factory(pool, batch_size):
    """A zero-argument factory of endless iterators over `pool` (batches of 8): batch_size / 8 consecutive pooled
    batches concatenated (the -1 padded answer fields padded to a common width), cycling over the pool."""
    import numpy as np

    if batch_size % 8:
        raise ValueError(f"train.batch_size must be a multiple of 8 (the pool's batch), got {batch_size}")
    per = batch_size // 8
    if per > len(pool):
        raise ValueError(f"train.batch_size {batch_size} needs {per} pooled batches, the pool holds {len(pool)}")

    def gen():
        i = 0
        while True:
            parts = [pool[(i + j) % len(pool)] for j in range(per)]
            i += per
            out = {}
            for k in parts[0]:
                arrs = [np.asarray(p[k]) for p in parts]
                if arrs[0].ndim == 2 and k.endswith(("_positions", "_task")):
                    width = max(a.shape[1] for a in arrs)
                    arrs = [_pad_cols(a, width) for a in arrs]
                out[k] = np.concatenate(arrs, axis=0)
            yield out

    return gen


# --- one variant -----------------------------------------------------------------------------------------------------
def pretrain_teacher(name, arch_fields, overrides, pool, *, smoke, root):
    """Pretrain one teacher; returns (record dict, HF export dir)."""
    import numpy as np

    from ahn_jax.training.pretrain import pretrain

    cfg = teacher_config(arch_fields, overrides, smoke=smoke)
    workdir = os.path.join(root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    logged, _ = pretrain(cfg, workdir, data_iter_factory=replay_factory(pool, int(cfg.train.batch_size)),
                         progress=False)
    pretrain_s = time.perf_counter() - t0
    with open(os.path.join(workdir, "teacher_eval.json")) as f:
        ev = json.load(f)
    # ms per update: windows after the first (which holds the compile), each `log_every` updates long
    every = int(cfg.train.log_every)
    later = [m["seconds"] / every for m in logged[1:] if m["step"] % every == 0]
    step_ms = 1e3 * float(np.median(later)) if later else float("nan")
    left = next((m["step"] for m in logged if m["answer_acc"] >= PLATEAU_ACC), None)
    fields = dict(cfg.model.random_init)
    rec = {
        "name": name, "arch": {k: fields[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "head_dim")},
        "overrides": overrides, "steps": int(cfg.train.steps), "batch_size": int(cfg.train.batch_size),
        "lr": float(cfg.train.lr), "seed": int(cfg.train.seed), "pretrain_s": round(pretrain_s, 1),
        "step_ms": round(step_ms, 2), "left_plateau_at": left, "teacher_eval": ev,
        "train_curve": [{"step": m["step"], "loss": round(m["loss"], 4), "answer_acc": round(m["answer_acc"], 4)}
                        for m in logged],
    }
    return rec, os.path.join(workdir, "teacher")


def run_one(name, arch_fields, overrides, pool, *, smoke, root, distil_above, ceiling_docs):
    t0 = time.perf_counter()
    rec, teacher_dir = pretrain_teacher(name, arch_fields, overrides, pool, smoke=smoke, root=root)
    print(f"--- {name}: pretrained in {rec['pretrain_s']} s ({rec['step_ms']} ms/update); held-out answer acc "
          f"{rec['teacher_eval']['all']:.3f}, beyond-window {rec['teacher_eval']['beyond_window']:.3f}; "
          f"left the plateau at update {rec['left_plateau_at']}", flush=True)
    t1 = time.perf_counter()
    rec["ceiling"] = demo_sweep.memory_ceiling(documents=ceiling_docs, teacher_dir=teacher_dir)
    rec["ceiling_s"] = round(time.perf_counter() - t1, 1)
    print(f"--- {name}: ceiling (evidence value nearest) "
          + ", ".join(f"{k} {v['nearest']:.3f}" for k, v in rec["ceiling"].items()), flush=True)
    rec["distil"] = []
    beyond = rec["teacher_eval"]["beyond_window"]
    if smoke or beyond > distil_above:  # the smoke distils regardless, to check the path end to end
        for k, (suffix, memory, extra, knobs) in enumerate(DISTIL):
            r = run_distil(k, f"{name}__{suffix}", teacher_dir, smoke=smoke, root=os.path.join(root, name))
            rec["distil"].append(r)
            print(f"--- {name} / {suffix}: {r['wall_s']} s; beyond-window acc {r['report']['beyond_window_accuracy']}"
                  f", gap closed {r['report']['gap_closed']:.2f}", flush=True)
    else:
        rec["distil_skipped"] = f"held-out beyond-window accuracy {beyond:.3f} <= --distil-above {distil_above}"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


def _distil_worker(k, name, teacher_dir, smoke, root, out_path):
    """Child process: DISTIL[k] into teacher_dir through demo_sweep.run_variant; the record as JSON at out_path."""
    _, memory, extra, knobs = DISTIL[k]
    r = demo_sweep.run_variant(name, memory, {"model.path": teacher_dir, **extra}, knobs, smoke=smoke, root=root)
    with open(out_path, "w") as f:
        json.dump(r, f)


def run_distil(k, name, teacher_dir, *, smoke, root):
    """DISTIL[k] in a fresh process. Why: on the 2-core CPU, distilling in the process that had just pretrained a
    batch-32 teacher stalled (XLA idle in BlockUntilReady, reproduced twice; the same distillation in a fresh process
    ran in 28 s). The cause is not found; a child process sidesteps it on every backend."""
    import subprocess

    out_path = os.path.join(root, name + ".json")
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    subprocess.run([sys.executable, os.path.abspath(__file__), "--distil-worker", str(k), name, teacher_dir,
                    "1" if smoke else "0", root, out_path], env=env, check=True)
    with open(out_path) as f:
        return json.load(f)


def estimate_s(overrides, step_ms, overhead_s):
    """Predicted wall time of a variant: updates x ms/update (scaled by batch from the measured batch) + overhead."""
    steps = overrides.get("train.steps", 6000)
    return steps * step_ms / 1e3 + overhead_s


def format_table(results):
    lines = [f"{'teacher':<22}{'H x D':>7}{'steps':>7}{'B':>4}{'lr':>8}{'s':>6}{'ms/up':>7}{'left@':>7}"
             f"{'acc':>7}{'acc>W':>7}{'soft':>7}{'delta':>7}{'oracle':>7}"]
    for r in results["variants"]:
        a, c = r["arch"], r["ceiling"]
        lines.append(f"{r['name']:<22}{a['num_attention_heads']:>3}x{a['head_dim']:<3}{r['steps']:>7}"
                     f"{r['batch_size']:>4}{r['lr']:>8.0e}{r['wall_s']:>6.0f}{r['step_ms']:>7.2f}"
                     f"{str(r['left_plateau_at']):>7}{r['teacher_eval']['all']:>7.3f}"
                     f"{r['teacher_eval']['beyond_window']:>7.3f}{c['softmax']['nearest']:>7.3f}"
                     f"{c['delta_b1']['nearest']:>7.3f}{c['delta_evidence_only']['nearest']:>7.3f}")
    lines.append("acc / acc>W: teacher held-out answer accuracy (all / evidence beyond window 32 + sinks 4); "
                 "soft / delta / oracle: retrieval ceiling (softmax, delta rule beta 1, evidence-only delta rule)")
    distils = [d for r in results["variants"] for d in r["distil"]]
    if distils:
        lines += ["", "GDN memory distilled into each teacher (demo report; target gap closed >= 0.5):",
                  demo_sweep.HEADER] + [demo_sweep.format_row(d) for d in distils]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=f"CPU check: {SMOKE['names']}, {SMOKE['steps']} updates")
    p.add_argument("--only", default="", help="comma-separated teacher names")
    p.add_argument("--root", default="/tmp/teacher_sweep", help="parent of the per-variant workdirs")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="skip a variant whose predicted end lies past this many seconds (recorded as skipped)")
    p.add_argument("--assume-step-ms", type=float, default=4.0,
                   help="ms per update (batch 32) assumed before the first variant measured one")
    p.add_argument("--assume-overhead-s", type=float, default=110.0,
                   help="per-variant seconds besides the updates (compile, eval, ceiling, 2 distillations) "
                        "assumed before the first variant measured it")
    p.add_argument("--distil-above", type=float, default=0.3,
                   help="distil only into teachers whose held-out beyond-window accuracy exceeds this")
    p.add_argument("--pool-docs", type=int, default=98304, help="documents in the replayed training pool")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="spawned processes that generate the pool")
    p.add_argument("--ceiling-docs", type=int, default=12, help="held-out documents of the retrieval ceiling")
    args = p.parse_args()
    by_name = {v[0]: v for v in TEACHERS}
    names = SMOKE["names"] if args.smoke else [v[0] for v in TEACHERS]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"--only: unknown teachers {missing}; known: {sorted(by_name)}")
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "teacher_sweep.json")
    t_all = time.perf_counter()

    n_batches = SMOKE["pool_batches"] if args.smoke else max(1, args.pool_docs // 8)
    pool = make_pool(n_batches, args.workers)
    pool_s = time.perf_counter() - t_all
    print(f"=== pool: {len(pool)} batches of 8 documents from {args.workers} workers in {pool_s:.1f} s", flush=True)

    import jax

    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": args.smoke,
               "pool": {"batches_of_8": len(pool), "workers": args.workers, "seconds": round(pool_s, 1)},
               "variants": [], "skipped": []}
    step_ms, overhead_s = args.assume_step_ms, args.assume_overhead_s

    def save():
        results["total_s"] = round(time.perf_counter() - t_all, 1)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, out_path)

    for n in names:
        _, arch_fields, overrides = by_name[n]
        elapsed = time.perf_counter() - t_all
        need = estimate_s(overrides, step_ms, overhead_s)
        if not args.smoke and elapsed + need > args.budget_s:
            results["skipped"].append({"name": n, "at_s": round(elapsed, 1), "predicted_s": round(need, 1)})
            print(f"=== {n}: skipped (at {elapsed:.0f} s, predicted {need:.0f} s, --budget-s {args.budget_s})",
                  flush=True)
            save()
            continue
        print(f"=== {n}: arch {arch_fields}, overrides {overrides} (predicted {need:.0f} s)", flush=True)
        r = run_one(n, arch_fields, overrides, pool, smoke=args.smoke, root=args.root,
                    distil_above=args.distil_above, ceiling_docs=2 if args.smoke else args.ceiling_docs)
        results["variants"].append(r)
        save()
        # conservative running estimates for the budget check: the slowest update and overhead seen so far
        if r["step_ms"] == r["step_ms"]:
            step_ms = max(step_ms if results["variants"][:-1] else 0.0, r["step_ms"])
        spent = r["wall_s"] - r["steps"] * r["step_ms"] / 1e3
        overhead_s = max(overhead_s if len(results["variants"]) > 1 else 0.0, spent)
        if not r["distil"] and not args.smoke:  # a skipped distillation does not predict the next variant's
            overhead_s = max(overhead_s, args.assume_overhead_s)

    table = format_table(results)
    print("\n" + table)
    if results["skipped"]:
        print("skipped (budget): " + ", ".join(s["name"] for s in results["skipped"]))
    save()
    print(f"total {results['total_s']} s on {results['device']}; JSON: {out_path}")
    with open(os.path.join(out_dir, "teacher_sweep.txt"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--pool-worker":
        _pool_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) == 8 and sys.argv[1] == "--distil-worker":
        _distil_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6], sys.argv[7])
    else:
        main()
