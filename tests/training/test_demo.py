"""The embedded demo (issue 7) and the trainer's determinism (issue 6): pretraining lowers the loss and exports a
loadable teacher; a shortened `python -m ahn_jax.train --config=configs/tiny_gdn.py` on the shipped teacher writes
report.json and its memory lowers the held-out KL of window-only attention; an interrupted + resumed run
reproduces the uninterrupted losses; a 1-device and an 8-device data mesh give the same losses."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs import tiny_gdn, tiny_teacher  # noqa: E402

from ahn_jax.train import make_data_factory  # noqa: E402


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run_cli(workdir, config, *overrides, devices=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "ahn_jax.train", f"--config={ROOT / 'configs' / config}", f"--workdir={workdir}",
           *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def test_pretrain_lowers_loss_and_exports_a_loadable_teacher(tmp_path):
    from ahn_jax.models.loading import load_pretrained
    from ahn_jax.training.pretrain import pretrain

    cfg = tiny_teacher.get_config()
    cfg.model.random_init = dict(cfg.model.random_init, hidden_size=32, intermediate_size=64, head_dim=8)
    cfg.data.min_length = cfg.data.cutoff_len = 128
    cfg.data.buckets = (128,)
    cfg.train.steps, cfg.train.log_every, cfg.train.lr, cfg.train.warmup_ratio = 12, 4, 1e-2, 0.0
    logged, model = pretrain(cfg, str(tmp_path), data_iter_factory=make_data_factory(cfg), progress=False)
    losses = [m["loss"] for m in logged]
    assert [m["step"] for m in logged] == [4, 8, 12]
    assert losses[-1] < losses[0] - 0.5, losses  # from ~log(512) the unigram statistics alone drop it fast
    teacher = load_pretrained(tmp_path / "teacher", dtype="float32")
    ids = np.random.default_rng(0).integers(0, 478, size=(2, 40)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(teacher(ids)), np.asarray(model(ids)), rtol=1e-5, atol=1e-5)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "teacher" / name).is_file(), name
    ev = json.loads((tmp_path / "teacher_eval.json").read_text())
    assert 0.0 <= ev["all"] <= 1.0 and ev["answers"] > 0
    with pytest.raises(FileExistsError, match="teacher"):  # no silent overwrite of an exported teacher
        pretrain(cfg, str(tmp_path), data_iter_factory=make_data_factory(cfg), progress=False)


def test_shipped_teacher_recalls_beyond_the_window():
    """The shipped teacher (full attention) must solve the demo's recall tasks, or the demo shows nothing."""
    from ahn_jax.models.loading import load_pretrained
    from ahn_jax.training.pretrain import heldout_answer_accuracy

    cfg = tiny_gdn.get_config()
    ev = heldout_answer_accuracy(load_pretrained(cfg.model.path, dtype="float32"), cfg, documents=16, seed=99)
    assert ev["beyond_window"] > 0.5, ev  # measured 0.70 on 32 documents (tiny_teacher/README.md)


@pytest.mark.slow  # > 2 min on a loaded 2-core CPU (timed out at 600 s in the report step): see the report
def test_demo_cli_report_and_memory_beats_window_only(tmp_path):
    res = _run_cli(tmp_path, "tiny_gdn.py", "--config.train.steps=60", "--config.train.lr=5e-3",
                   "--config.demo.documents=24", "--config.ckpt.every=60")
    report = json.loads((tmp_path / "report.json").read_text())
    acc = report["beyond_window_accuracy"]
    assert set(acc) == {"teacher", "window_only", "memory"}
    assert set(report["heldout_kl"]) == {"window_only", "memory"}
    assert report["answers"]["beyond"] >= 50
    assert "beyond-window acc" in res.stdout
    # Measured on the full run (200 updates): KL 0.95 -> 0.38, but beyond-window accuracy only 0.021 -> 0.028 (teacher
    # 0.69): the accuracy gain is not yet robust, so the test checks the KL, which the memory reliably lowers.
    assert all(0.0 <= acc[v] <= 1.0 for v in acc)
    assert report["heldout_kl"]["memory"] < 0.8 * report["heldout_kl"]["window_only"], report
    assert (tmp_path / "ahn.safetensors").is_file()


class _StopAfter:
    """A data iterator that raises after `n` batches (an interrupted run), keeping get_state/set_state."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __next__(self):
        if self.n == 0:
            raise KeyboardInterrupt("simulated interruption")
        self.n -= 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def _short_distill_config():
    cfg = tiny_gdn.get_config()
    cfg.data.min_length = cfg.data.cutoff_len = 96
    cfg.data.buckets = (96,)
    cfg.train.steps, cfg.train.log_every, cfg.train.lr = 6, 1, 3e-3
    cfg.ckpt.every, cfg.ckpt.async_save = 1, False
    cfg.train.export_ahn = False
    return cfg


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    from ahn_jax.training.loop import train

    cfg = _short_distill_config()
    full, _ = train(cfg, str(tmp_path / "full"), data_iter_factory=make_data_factory(cfg), progress=False)
    factory = make_data_factory(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "cut"), data_iter_factory=lambda: _StopAfter(factory(), 3), progress=False)
    resumed, _ = train(cfg, str(tmp_path / "cut"), data_iter_factory=make_data_factory(cfg), progress=False)
    cut = _metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    np.testing.assert_array_equal([m["loss"] for m in cut], [m["loss"] for m in full])


@pytest.mark.slow
def test_one_and_eight_device_meshes_give_the_same_losses(tmp_path):
    args = ("--config.train.steps=3", "--config.train.log_every=1", "--config.data.min_length=96",
            "--config.data.cutoff_len=96", "--config.data.buckets=(96,)", "--config.train.export_ahn=False",
            "--config.demo.documents=0")
    _run_cli(tmp_path / "one", "tiny_gdn.py", "--config.mesh.data=1", *args, devices=1)
    _run_cli(tmp_path / "eight", "tiny_gdn.py", "--config.mesh.data=8", *args, devices=8)
    one, eight = _metrics(tmp_path / "one"), _metrics(tmp_path / "eight")
    assert [m["step"] for m in one] == [m["step"] for m in eight] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in one], [m["loss"] for m in eight], rtol=1e-5, atol=1e-6)


class _SigtermAfter:
    """Data iterator that sends this process SIGTERM while the n-th batch is being consumed (preemption)."""

    def __init__(self, it, n):
        self.it, self.n, self.seen = it, n, 0

    def __next__(self):
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    from ahn_jax.training.loop import train

    cfg = _short_distill_config()
    cfg.ckpt.every = 100  # only the SIGTERM save can leave step 2
    full, _ = train(cfg, str(tmp_path / "full"), data_iter_factory=make_data_factory(cfg), progress=False)
    factory = make_data_factory(cfg)
    stopped, _ = train(cfg, str(tmp_path / "cut"), data_iter_factory=lambda: _SigtermAfter(factory(), 2),
                       progress=False)
    assert [m["step"] for m in stopped] == [1, 2]  # stopped cleanly after the step in which the signal came
    # Orbax also keeps its first save (step 1); step 2 exists only because of the SIGTERM (every=100).
    assert max(int(p) for p in os.listdir(tmp_path / "cut" / "checkpoints") if p.isdigit()) == 2
    resumed, _ = train(cfg, str(tmp_path / "cut"), data_iter_factory=make_data_factory(cfg), progress=False)
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]
    np.testing.assert_array_equal([m["loss"] for m in stopped + resumed], [m["loss"] for m in full])


@pytest.mark.slow
def test_two_jax_distributed_processes_agree_with_one_process(tmp_path):
    """launch/local_multiprocess.sh: two CPU processes joined by jax.distributed (one device each, each feeding its
    own host shard of the batch) give the losses of one process with two devices."""
    args = ["--config.train.steps=2", "--config.train.batch_size=2", "--config.train.log_every=1",
            "--config.data.min_length=96", "--config.data.cutoff_len=96", "--config.data.buckets=(96,)",
            "--config.train.export_ahn=False", "--config.demo.documents=0", "--config.ckpt.async_save=False"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "--config", "configs/tiny_gdn.py",
                          "--workdir", str(tmp_path / "two"), "--num-processes", "2", "--devices-per-process", "1",
                          *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _run_cli(tmp_path / "one", "tiny_gdn.py", *args, devices=2)
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5, atol=1e-7)


# --- demo sweep knobs (benchmarks/demo_sweep.py): answer-weighted distillation, slow decay init -------------------
def _sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_sweep

    return demo_sweep


def _dense_weighted_kl(h_t, h_s, head, weights):
    """Plain reference: sum_t w_t KL_t / sum_t w_t, dense logits (jnp, so it also gives the reference gradient)."""
    lt = jax.nn.log_softmax(h_t @ head, -1)
    ls = jax.nn.log_softmax(h_s @ head, -1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    return jnp.sum(kl * weights) / jnp.sum(weights)


def test_float_loss_mask_weights_the_distillation_loss_like_a_weighted_mean():
    """The sweep's answer_weight hands distill_loss float weights instead of a 0/1 mask: the loss and its gradient
    must be the weighted mean of the per-position KL (and step.loss_mask must keep the weights past S+W)."""
    from ahn_jax.training.losses import distill_loss
    from ahn_jax.training.step import loss_mask

    rng = np.random.default_rng(3)
    B, T, D, V = 2, 21, 8, 24
    h_t, h_s = (jnp.asarray(x) for x in rng.normal(size=(2, B, T, D)).astype(np.float32))
    head = jnp.asarray(rng.normal(size=(D, V)).astype(np.float32))
    weights = np.where(rng.uniform(size=(B, T)) < 0.2, 10.0, 1.0).astype(np.float32)
    weights[:, :3] = 0.0
    masked = loss_mask({"loss_mask": weights}, 4, 2, True)
    expect = weights * (np.arange(T)[None] >= 6)
    np.testing.assert_array_equal(np.asarray(masked), expect)

    def ours(h):
        return distill_loss(h_t, h, head, masked, chunk=8)[0]

    def ref(h):
        return _dense_weighted_kl(h_t, h, head, masked)

    np.testing.assert_allclose(float(ours(h_s)), float(ref(h_s)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(ours))(h_s)), np.asarray(jax.grad(ref)(h_s)),
                               rtol=1e-4, atol=1e-6)
    unweighted = distill_loss(h_t, h_s, head, (masked > 0).astype(jnp.float32), chunk=8)[0]
    assert abs(float(ours(h_s)) - float(unweighted)) > 1e-3  # the weights change the loss


def test_answer_weighted_batches_scale_answer_tokens_only():
    sweep = _sweep()
    rng = np.random.default_rng(4)
    mask = rng.uniform(size=(2, 12)) < 0.8
    batches = [{"input_ids": rng.integers(0, 50, (2, 12)), "loss_mask": mask,
                "answer_positions": np.array([[2, 5, -1], [7, -1, -1]])}]

    class It:
        def __init__(self):
            self.i, self.state = iter(batches), {"pos": 0}

        def __next__(self):
            return next(self.i)

        def get_state(self):
            return self.state

        def set_state(self, s):
            self.state = s

    it = sweep.weighted_data_factory(It, 7.0)()
    w = next(it)["loss_mask"]
    expect = mask.astype(np.float32)
    expect[0, [2, 5]] *= 7.0
    expect[1, 7] *= 7.0
    np.testing.assert_array_equal(w, expect)
    assert it.get_state() == {"pos": 0}


def test_slow_decay_init_keeps_evidence_for_a_hundred_tokens():
    """decay_init='slow' gives every GDN / Mamba2 head a retention over 100 tokens in the documented range
    (exp(-100 dt) for dt in [1e-4, 1e-2], up to the small a_proj / dt_proj term), measured on real documents by
    the same decay_stats the sweep reports; checked against g computed by hand from the parameters."""
    from ahn_jax.data import synthetic
    from ahn_jax.training import loop

    sweep = _sweep()
    cfg = tiny_gdn.get_config("gdn")
    docs = [synthetic.generate_document(5, 0, split="heldout", length=64,
                                        config=synthetic.TaskConfig(**dict(cfg.data.tasks)))]
    for memory in ("gdn", "mamba2"):
        model = loop.build_model(tiny_gdn.get_config(memory))
        sweep.slow_decay_init(model)
        stats = sweep.decay_stats(model, docs, 32, 4)
        if memory == "gdn":
            gdn_model, gdn_stats = model, stats
        assert set(stats) == {"0", "1"}
        for heads in stats.values():
            assert len(heads) == 4 and all(0.3 < r <= 1.0 for r in heads), (memory, stats)
            assert heads[0] > 0.97 and heads == sorted(heads, reverse=True), (memory, stats)
    # By hand for layer 0 of GDN: g = -exp(A_log) * softplus(u . a_proj + dt_bias), u = the first layer's prenorm.
    model = gdn_model
    ids = jnp.asarray(np.stack([d["input_ids"] for d in docs]))
    u = model.base.model.layers[0].input_layernorm(model.base.model.embed_tokens(ids))[:, 4:]
    mem = model.memories[0]
    g = -np.exp(np.asarray(mem.A_log[...])) * np.log1p(np.exp(np.asarray(u) @ np.asarray(mem.a_proj[...])
                                                               + np.asarray(mem.dt_bias[...])))
    np.testing.assert_allclose(gdn_stats["0"], np.exp(100 * g.mean(axis=(0, 1))),
                               atol=1e-3)


@pytest.mark.slow  # ~2.5 min on a loaded 2-core CPU
def test_demo_sweep_smoke_writes_json_and_table(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_sweep.py"), "--smoke", "--root",
                          str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "demo_sweep.json").read_text())
    assert [v["name"] for v in out["variants"]] == _sweep().SMOKE
    for v in out["variants"]:
        assert set(v["report"]["beyond_window_accuracy"]) == {"teacher", "window_only", "memory"}
        assert v["steps"] == 5 and v["wall_s"] > 0
    assert out["variants"][0]["retention100_init"]  # the GDN variant reports its decay
    assert "mem>W" in res.stdout


def test_recall_report_matches_a_per_answer_reference():
    """evaluate_recall (the demo's report) against a plain per-answer loop over the three models' logits:
    accuracy, p(correct answer) and answer KL, beyond and within the window; the memory's o_proj is randomised so
    that the memory variant differs from window-only."""
    from ahn_jax.data import synthetic
    from ahn_jax.training import demo_report, loop

    cfg = tiny_gdn.get_config("gdn")
    model = loop.build_model(cfg)
    key = jax.random.key(7)
    for i, mem in enumerate(model.memories):
        mem.o_proj[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), mem.o_proj[...].shape)
    W, S = 32, 2  # 11 beyond-window and 10 within-window answers in these 3 documents
    docs = [synthetic.generate_document(11, i, split="heldout", length=96,
                                        config=synthetic.TaskConfig(**dict(cfg.data.tasks))) for i in range(3)]
    rep = demo_report.evaluate_recall(model, docs, W, S, batch=2)
    ids = jnp.asarray(np.stack([d["input_ids"] for d in docs]))
    logp = {"teacher": jax.nn.log_softmax(model(ids, teacher=True), -1),
            "window_only": jax.nn.log_softmax(model(ids, window=W, sinks=S, use_memory=False), -1),
            "memory": jax.nn.log_softmax(model(ids, window=W, sinks=S), -1)}
    logp = {k: np.asarray(v, np.float64) for k, v in logp.items()}
    ref = {v: {"beyond": [], "within": []} for v in logp}
    by_task = {v: {} for v in logp}
    for b, d in enumerate(docs):
        beyond = synthetic.evidence_beyond_window(d["answer_positions"], d["evidence_positions"], W, S)
        for a, far, task in zip(d["answer_positions"], beyond, d["answer_task"]):
            where = "beyond" if far else "within"
            tgt = d["input_ids"][a]
            for v, lp in logp.items():
                kl = float(np.sum(np.exp(logp["teacher"][b, a - 1]) * (logp["teacher"][b, a - 1] - lp[b, a - 1])))
                ref[v][where].append((lp[b, a - 1].argmax() == tgt, np.exp(lp[b, a - 1, tgt]), kl))
                if far:
                    by_task[v].setdefault(synthetic.TASKS[task], []).append(lp[b, a - 1].argmax() == tgt)
    assert rep["answers"] == {w: len(ref["teacher"][w]) for w in ("beyond", "within")}
    assert min(rep["answers"].values()) > 0
    for v in logp:
        for w in ("beyond", "within"):
            r = np.asarray(ref[v][w], np.float64).mean(0)
            key_acc = "beyond_window_accuracy" if w == "beyond" else "within_window_accuracy"
            np.testing.assert_allclose(rep[key_acc][v], r[0], atol=1e-9)
            np.testing.assert_allclose(rep["p_correct"][v][w], r[1], rtol=1e-4, atol=1e-6)
            if v != "teacher":
                np.testing.assert_allclose(rep["answer_kl"][v][w], r[2], rtol=1e-3, atol=1e-5)
    assert rep["p_correct"]["memory"] != rep["p_correct"]["window_only"]
    assert set(rep["beyond_window_accuracy_by_task"]) == set(by_task["teacher"])
    for task, row in rep["beyond_window_accuracy_by_task"].items():
        assert row["answers"] == len(by_task["teacher"][task])
        for v in logp:
            np.testing.assert_allclose(row[v], np.mean(by_task[v][task]), atol=1e-9)
    assert "p(ans) beyond" in demo_report.format_table(dict(rep, gap_closed=0.0))
