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
  4. if it left the plateau (held-out beyond-window accuracy > --distil-above), distils a memory into it with each
     recipe named by --distil (DISTIL_RECIPES, priority order; default the demo recipe and the demo sweep's best),
     each in a child process (--distil-parallel at a time) through demo_sweep.run_variant (loop.train + demo_report),
     with model.path = its HF export.
--save-teacher writes each teacher's HF export (+ teacher_eval.json, metrics.jsonl) as $OUT/teacher_<name>.tar.gz.
--budget-s: a teacher (pretrain + ceiling) or a distillation is started only if its predicted end fits; predictions
start from ASSUME (measured on the H100) and are scaled by what this run measured so far (CostModel); whatever is
not started is recorded as skipped. Writes $OUT/teacher_sweep.json after every teacher (a timeout keeps what
finished) and prints a table at the end.

    PYTHONPATH=$PWD python3 benchmarks/teacher_sweep.py              # the GPU sweep (one H100, < 9 minutes)
    PYTHONPATH=$PWD python3 benchmarks/teacher_sweep.py --smoke      # CPU check: 2 tiny variants end to end
    PYTHONPATH=$PWD python3 benchmarks/teacher_sweep.py --only w128_h4x32 --save-teacher \\
        --distil gdn_slow_aw10_2k,allmem_aw10_1k --distil-parallel 2 --ceiling-docs 0 --budget-s 540

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
    # Fifth session: 4 x 32 was the one shape that helped (0.22-0.29 of the gap); more heads of each width next.
    ("w256_h8x32", arch(256, 8, 32), {**B32, "train.steps": 12000}),
    ("w128_h8x16", arch(128, 8, 16), {**B32, "train.steps": 12000}),
]
SMOKE = {"names": ["w128_h2x64", "w64_h4x16_control"], "steps": 12, "log_every": 4, "pool_batches": 24}
PLATEAU_ACC = 0.3  # training-batch answer accuracy that marks "left the recall plateau" (chance is ~0.04)
# Named distillation recipes for --distil (memory, overrides besides model.path, knobs), as demo_sweep.VARIANTS:
# configs/tiny_<memory>.py (200 steps, lr 3e-3) + dotted overrides + the sweep's knobs (demo_sweep docstring).
AW10 = {"answer_weight": 10.0}
DISTIL_RECIPES = {
    "gdn": ("gdn", {}, {}),  # the demo recipe, configs/tiny_gdn.py as shipped
    "gdn_slow_aw10_1k": ("gdn", {"train.steps": 1000}, demo_sweep.SW),  # the demo sweep's best
    "gdn_slow_aw10_2k": ("gdn", {"train.steps": 2000}, demo_sweep.SW),
    "gdn_slow_aw10_1k_lr1e-2": ("gdn", {"train.steps": 1000, "train.lr": 1e-2}, demo_sweep.SW),
    "allmem_aw10_1k": ("allmem", {"train.steps": 1000}, AW10),
    "dn_aw10_1k": ("dn", {"train.steps": 1000}, AW10),
    "mamba2_slow_aw10_1k": ("mamba2", {"train.steps": 1000}, demo_sweep.SW),
    "gdn_slow_aw10_1k_layer2": ("gdn", {"train.steps": 1000, "ahn.layers": (1,)}, demo_sweep.SW),  # last layer only
}
DEFAULT_DISTIL = "gdn,gdn_slow_aw10_1k"
SMOKE_DISTIL = "gdn,allmem_aw10_1k"  # --smoke without --distil: two recipes of different memories

# Initial cost model of the --budget-s check, from the H100 runs of 2026-11-22 (jax 0.11.2; teachers w128_h2x64 and
# w128_h4x32, 12000 updates of 32): pretrain 54 / 63 s at 2.7 / 3.1 ms per update, i.e. ~26 s besides the updates
# (compile, held-out eval, export); ceiling 37 / 44 s for 12 documents (numpy delta rules on the host); a distillation
# as seen from this process (child start + compile + train + report) 200 steps ~61 s, 1000 steps ~82 s, i.e. ~56 s
# fixed + ~26 ms per step (run_variant's own wall was 38-43 / 60-61 s: ~22 s of each child is process start, JAX/GPU
# init and exit). The assumptions are scaled by measured / assumed of the runs finished so far (CostModel).
ASSUME = {"teacher_fixed_s": 26.0, "step_ms": 3.1, "ceiling_s_per_doc": 3.6, "distil_fixed_s": 56.0,
          "distil_step_ms": 26.0}


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


class CostModel:
    """Predicted seconds of the parts of a run: the ASSUME model scaled by the median measured / assumed ratio of the
    same kind of part finished so far (1 before any). A distillation's assumption is multiplied by
    `parallel_slowdown` when --distil-parallel > 1 (runs share the GPU and the host)."""

    def __init__(self, assume, parallel_slowdown=1.0):
        self.assume, self.parallel_slowdown = dict(assume), float(parallel_slowdown)
        self.ratios = {"teacher": [], "ceiling": [], "distil": []}

    def base(self, kind, n):
        """The unscaled assumption: n = updates (teacher), documents (ceiling) or steps (distil)."""
        a = self.assume
        if kind == "teacher":
            return a["teacher_fixed_s"] + n * a["step_ms"] / 1e3
        if kind == "ceiling":
            return n * a["ceiling_s_per_doc"]
        if kind == "distil":
            return (a["distil_fixed_s"] + n * a["distil_step_ms"] / 1e3) * self.parallel_slowdown
        raise ValueError(f"CostModel: unknown kind {kind!r}")

    def ratio(self, kind):
        r = sorted(self.ratios[kind])
        return 1.0 if not r else (r[len(r) // 2] if len(r) % 2 else 0.5 * (r[len(r) // 2 - 1] + r[len(r) // 2]))

    def predict(self, kind, n):
        return self.ratio(kind) * self.base(kind, n)

    def record(self, kind, n, seconds):
        base = self.base(kind, n)
        if base > 0 and seconds == seconds:
            self.ratios[kind].append(seconds / base)


def distil_steps(recipe, smoke):
    """Updates of a recipe: its train.steps override, else its memory config's (5 in the smoke: run_variant)."""
    if smoke:
        return 5
    memory, overrides, _ = DISTIL_RECIPES[recipe]
    if "train.steps" in overrides:
        return int(overrides["train.steps"])
    from configs import tiny_gdn

    return int(tiny_gdn.get_config(memory).train.steps)


def save_teacher_tar(name, workdir, out_dir):
    """workdir/teacher (the HF export) + teacher_eval.json + metrics.jsonl as ONE out_dir/teacher_<name>.tar.gz holding
    the folder teacher_<name>/ (what the GPU machine can return: few files, each <= 16 MB)."""
    import tarfile

    path = os.path.join(out_dir, f"teacher_{name}.tar.gz")
    top = f"teacher_{name}"
    with tarfile.open(path + ".tmp", "w:gz") as tar:
        tar.add(os.path.join(workdir, "teacher"), arcname=top)
        for extra in ("teacher_eval.json", "metrics.jsonl"):
            if os.path.exists(os.path.join(workdir, extra)):
                tar.add(os.path.join(workdir, extra), arcname=f"{top}/{extra}")
    os.replace(path + ".tmp", path)
    size = os.path.getsize(path)
    rec = {"path": os.path.basename(path), "bytes": size}
    if size > 16 * 2 ** 20:
        rec["warning"] = "over 16 MB: the GPU machine will not return it"
    return rec


def run_one(name, arch_fields, overrides, pool, *, smoke, root, distil_above, ceiling_docs, recipes, parallel, cost,
            t_all, budget_s, save_dir=None, on_progress=lambda rec: None):
    """One teacher: pretrain, optional tar.gz export (save_dir), retrieval ceiling (ceiling_docs > 0), distillations
    of `recipes` that fit the budget (run_distils). Returns the record; measured parts update `cost`;
    on_progress(partial record) after each part, so that a run killed mid-teacher keeps what finished."""
    t0 = time.perf_counter()
    rec, teacher_dir = pretrain_teacher(name, arch_fields, overrides, pool, smoke=smoke, root=root)
    cost.record("teacher", rec["steps"], rec["pretrain_s"])
    print(f"--- {name}: pretrained in {rec['pretrain_s']} s ({rec['step_ms']} ms/update); held-out answer acc "
          f"{rec['teacher_eval']['all']:.3f}, beyond-window {rec['teacher_eval']['beyond_window']:.3f}; "
          f"left the plateau at update {rec['left_plateau_at']}", flush=True)
    if save_dir is not None:
        rec["saved_teacher"] = save_teacher_tar(name, os.path.join(root, name), save_dir)
        print(f"--- {name}: saved {rec['saved_teacher']}", flush=True)
    on_progress(rec)
    rec["ceiling"] = None
    if ceiling_docs > 0:
        t1 = time.perf_counter()
        rec["ceiling"] = demo_sweep.memory_ceiling(documents=ceiling_docs, teacher_dir=teacher_dir)
        rec["ceiling_s"] = round(time.perf_counter() - t1, 1)
        cost.record("ceiling", ceiling_docs, rec["ceiling_s"])
        print(f"--- {name}: ceiling (evidence value nearest) "
              + ", ".join(f"{k} {v['nearest']:.3f}" for k, v in rec["ceiling"].items()), flush=True)
        on_progress(rec)
    rec["distil"], rec["distil_skipped"], rec["distil_failed"] = [], [], []
    beyond = rec["teacher_eval"]["beyond_window"]
    if smoke or beyond > distil_above:  # the smoke distils regardless, to check the path end to end
        run_distils(rec, name, teacher_dir, recipes, smoke=smoke, root=os.path.join(root, name), parallel=parallel,
                    cost=cost, t_all=t_all, budget_s=budget_s, on_progress=on_progress)
    else:
        rec["distil_not_run"] = f"held-out beyond-window accuracy {beyond:.3f} <= --distil-above {distil_above}"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


def run_distils(rec, name, teacher_dir, recipes, *, smoke, root, parallel, cost, t_all, budget_s,
                on_progress=lambda rec: None):
    """Distil each recipe (priority order) into teacher_dir, `parallel` child processes at a time (run_distil's
    reason for children). A recipe whose predicted end lies past budget_s (seconds since t_all) is not started and
    is appended to rec["distil_skipped"]; a later, cheaper one may still start. A failed child is recorded in
    rec["distil_failed"] (its traceback is on stderr) and the sweep goes on. rec["distil"] keeps recipe order;
    on_progress(rec) after each finished child."""
    import subprocess

    os.makedirs(root, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    pending, running, done = list(recipes), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            recipe = pending.pop(0)
            steps = distil_steps(recipe, smoke)
            at = time.perf_counter() - t_all
            need = cost.predict("distil", steps)
            if at + need > budget_s:
                rec["distil_skipped"].append({"recipe": recipe, "at_s": round(at, 1), "predicted_s": round(need, 1)})
                print(f"--- {name} / {recipe}: skipped (at {at:.0f} s, predicted {need:.0f} s, budget {budget_s})",
                      flush=True)
                continue
            vname = f"{name}__{recipe}"
            out_path = os.path.join(root, vname + ".json")
            if os.path.exists(out_path):
                os.remove(out_path)
            print(f"--- {name} / {recipe}: started at {at:.0f} s (predicted {need:.0f} s)", flush=True)
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--distil-worker", recipe, vname,
                                     teacher_dir, "1" if smoke else "0", root, out_path], env=env)
            running.append((proc, recipe, steps, out_path, time.perf_counter()))
        time.sleep(0.2)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, recipe, steps, out_path, t_start = item
            proc_s = time.perf_counter() - t_start
            if proc.returncode or not os.path.exists(out_path):
                rec["distil_failed"].append({"recipe": recipe, "exit_code": proc.returncode,
                                             "proc_s": round(proc_s, 1)})
                print(f"--- {name} / {recipe}: FAILED (exit code {proc.returncode}) after {proc_s:.0f} s", flush=True)
                continue
            with open(out_path) as f:
                r = json.load(f)
            r["recipe"], r["proc_s"] = recipe, round(proc_s, 1)
            cost.record("distil", steps, proc_s)
            done[recipe] = r
            print(f"--- {name} / {recipe}: {r['proc_s']} s ({r['wall_s']} s in the child); beyond-window acc "
                  f"{r['report']['beyond_window_accuracy']}, gap closed {r['report']['gap_closed']:.2f}", flush=True)
            rec["distil"] = [done[x] for x in recipes if x in done]
            on_progress(rec)


def _distil_worker(recipe, name, teacher_dir, smoke, root, out_path):
    """Child process: DISTIL_RECIPES[recipe] into teacher_dir through demo_sweep.run_variant; the record as JSON at
    out_path. Why a child: on the 2-core CPU, distilling in the process that had just pretrained a batch-32 teacher
    stalled (XLA idle in BlockUntilReady, reproduced twice; the same distillation in a fresh process ran in 28 s).
    The cause is not found; a child process sidesteps it on every backend."""
    memory, extra, knobs = DISTIL_RECIPES[recipe]
    r = demo_sweep.run_variant(name, memory, {"model.path": teacher_dir, **extra}, knobs, smoke=smoke, root=root)
    with open(out_path + ".tmp", "w") as f:
        json.dump(r, f)
    os.replace(out_path + ".tmp", out_path)


def format_table(results):
    lines = [f"{'teacher':<22}{'H x D':>7}{'steps':>7}{'B':>4}{'lr':>8}{'s':>6}{'ms/up':>7}{'left@':>7}"
             f"{'acc':>7}{'acc>W':>7}{'soft':>7}{'delta':>7}{'oracle':>7}"]
    for r in results["variants"]:
        a, c = r["arch"], r["ceiling"]
        lines.append(f"{r['name']:<22}{a['num_attention_heads']:>3}x{a['head_dim']:<3}{r['steps']:>7}"
                     f"{r['batch_size']:>4}{r['lr']:>8.0e}{r['wall_s']:>6.0f}{r['step_ms']:>7.2f}"
                     f"{str(r['left_plateau_at']):>7}{r['teacher_eval']['all']:>7.3f}"
                     f"{r['teacher_eval']['beyond_window']:>7.3f}"
                     + ("".join(f"{c[k]['nearest']:>7.3f}" for k in ("softmax", "delta_b1", "delta_evidence_only"))
                        if c else f"{'-':>7}" * 3))
    lines.append("acc / acc>W: teacher held-out answer accuracy (all / evidence beyond window 32 + sinks 4); "
                 "soft / delta / oracle: retrieval ceiling (softmax, delta rule beta 1, evidence-only delta rule)")
    distils = [d for r in results["variants"] for d in r["distil"]]
    if distils:
        lines += ["", "Memory distilled into each teacher (demo report; target gap closed >= 0.5; wall s = in the "
                      "child process):", demo_sweep.HEADER] + [demo_sweep.format_row(d) for d in distils]
    for r in results["variants"]:
        for d in r.get("distil_skipped", []):
            lines.append(f"{r['name']}__{d['recipe']}: skipped (budget; at {d['at_s']} s, predicted {d['predicted_s']} s)")
        for d in r.get("distil_failed", []):
            lines.append(f"{r['name']}__{d['recipe']}: FAILED (exit code {d['exit_code']})")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help=f"CPU check: {SMOKE['names']}, {SMOKE['steps']} updates, recipes {SMOKE_DISTIL} (5 steps)")
    p.add_argument("--only", default="", help="comma-separated teacher names")
    p.add_argument("--distil", default=None,
                   help=f"comma-separated distillation recipes in priority order (DISTIL_RECIPES: "
                        f"{', '.join(DISTIL_RECIPES)}); default {DEFAULT_DISTIL} ({SMOKE_DISTIL} with --smoke)")
    p.add_argument("--distil-parallel", type=int, default=1,
                   help="distillation child processes at a time on the one device")
    p.add_argument("--parallel-slowdown", type=float, default=1.6,
                   help="assumed wall factor of one distillation while --distil-parallel > 1 share the device, "
                        "until measured")
    p.add_argument("--save-teacher", action="store_true",
                   help="after pretraining, write each teacher's HF export as $OUT/teacher_<name>.tar.gz")
    p.add_argument("--root", default="/tmp/teacher_sweep", help="parent of the per-variant workdirs")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no teacher / distillation whose predicted end lies past this many seconds since the "
                        "start (recorded as skipped); default 500, none with --smoke")
    for key, val in ASSUME.items():
        p.add_argument("--assume-" + key.replace("_", "-"), type=float, default=val,
                       help=f"cost model before measurements (module constant ASSUME), default {val}")
    p.add_argument("--distil-above", type=float, default=0.3,
                   help="distil only into teachers whose held-out beyond-window accuracy exceeds this")
    p.add_argument("--pool-docs", type=int, default=98304, help="documents in the replayed training pool")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="spawned processes that generate the pool")
    p.add_argument("--ceiling-docs", type=int, default=12,
                   help="held-out documents of the retrieval ceiling; 0 skips it (host-bound, ~3.6 s per document)")
    args = p.parse_args()
    by_name = {v[0]: v for v in TEACHERS}
    names = SMOKE["names"] if args.smoke else [v[0] for v in TEACHERS]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"--only: unknown teachers {missing}; known: {sorted(by_name)}")
    distil_arg = args.distil if args.distil is not None else (SMOKE_DISTIL if args.smoke else DEFAULT_DISTIL)
    recipes = [n.strip() for n in distil_arg.split(",") if n.strip()]
    unknown = [n for n in recipes if n not in DISTIL_RECIPES]
    if unknown:
        raise SystemExit(f"--distil: unknown recipes {unknown}; known: {list(DISTIL_RECIPES)}")
    if args.distil_parallel < 1:
        raise SystemExit(f"--distil-parallel must be >= 1, got {args.distil_parallel}")
    budget_s = args.budget_s if args.budget_s is not None else (float("inf") if args.smoke else 500.0)
    assume = {k: getattr(args, "assume_" + k) for k in ASSUME}
    cost = CostModel(assume, args.parallel_slowdown if args.distil_parallel > 1 else 1.0)
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "teacher_sweep.json")
    t_all = time.perf_counter()

    n_batches = SMOKE["pool_batches"] if args.smoke else max(1, args.pool_docs // 8)
    pool = make_pool(n_batches, args.workers)
    pool_s = time.perf_counter() - t_all
    print(f"=== pool: {len(pool)} batches of 8 documents from {args.workers} workers in {pool_s:.1f} s", flush=True)

    import jax

    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": args.smoke, "recipes": recipes,
               "distil_parallel": args.distil_parallel, "budget_s": budget_s, "assume": assume,
               "pool": {"batches_of_8": len(pool), "workers": args.workers, "seconds": round(pool_s, 1)},
               "variants": [], "skipped": []}
    ceiling_docs = min(args.ceiling_docs, 2) if args.smoke else args.ceiling_docs

    def save():
        results["total_s"] = round(time.perf_counter() - t_all, 1)
        results["cost_ratios"] = {k: cost.ratio(k) for k in cost.ratios}
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, out_path)

    for n in names:
        _, arch_fields, overrides = by_name[n]
        steps = SMOKE["steps"] if args.smoke else int(overrides.get("train.steps", 6000))
        elapsed = time.perf_counter() - t_all
        # the teacher and its ceiling must fit; each distillation is checked when it would start (run_distils)
        need = cost.predict("teacher", steps) + cost.predict("ceiling", ceiling_docs)
        if elapsed + need > budget_s:
            results["skipped"].append({"name": n, "at_s": round(elapsed, 1), "predicted_s": round(need, 1)})
            print(f"=== {n}: skipped (at {elapsed:.0f} s, predicted {need:.0f} s, budget {budget_s})", flush=True)
            save()
            continue
        print(f"=== {n}: arch {arch_fields}, overrides {overrides} (teacher + ceiling predicted {need:.0f} s)",
              flush=True)
        r = run_one(n, arch_fields, overrides, pool, smoke=args.smoke, root=args.root,
                    distil_above=args.distil_above, ceiling_docs=ceiling_docs, recipes=recipes,
                    parallel=args.distil_parallel, cost=cost, t_all=t_all, budget_s=budget_s,
                    save_dir=out_dir if args.save_teacher else None,
                    on_progress=lambda rec: (results.__setitem__("unfinished_variant", rec), save()))
        results.pop("unfinished_variant", None)
        results["variants"].append(r)
        save()

    table = format_table(results)
    print("\n" + table)
    if results["skipped"]:
        print("skipped teachers (budget): " + ", ".join(s["name"] for s in results["skipped"]))
    save()
    print(f"total {results['total_s']} s on {results['device']}; JSON: {out_path}")
    with open(os.path.join(out_dir, "teacher_sweep.txt"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--pool-worker":
        _pool_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) == 8 and sys.argv[1] == "--distil-worker":
        _distil_worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6], sys.argv[7])
    else:
        main()
