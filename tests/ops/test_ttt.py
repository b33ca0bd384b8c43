"""AllMem TTT-MLP memory (ahn_jax/ops/ttt.py) against references written here from spec/ALLMEM.md §3.3-3.5 and §5.

The reference is a naive float64 numpy token loop per (batch, head): read every token with the weights of the last
completed chunk; when a chunk fills, renormalise, sum per-token gradients (outer products) and apply the momentum
recursion. It shares no code with the op. The op's batched inner gradients are checked against jax.grad separately,
and its outer gradients against finite differences of the float64 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ahn_jax.ops import dispatch
from ahn_jax.ops.ttt import (TTTState, ttt_mlp, ttt_mlp_init_pending, ttt_mlp_init_state, ttt_mlp_prefill,
                             ttt_mlp_step)
from ahn_jax.ops.ttt_grads import inner_grads, renormalize, row_norms

# ---------------------------------------------------------------------------------------------------------------
# inputs


def make_inputs(seed, batch=2, seq=40, heads=2, dk=8, dh=16, forget=False):
    """Random float32 inputs (numpy RNG: jax.random would compile anew for every shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    uniform = lambda lo, hi, *shape: rng.uniform(lo, hi, shape).astype(np.float32)  # noqa: E731
    unit = lambda t: t / np.linalg.norm(t, axis=-1, keepdims=True)  # noqa: E731
    x = dict(q=unit(normal(batch, seq, heads, dk)), k=unit(normal(batch, seq, heads, dk)),
             v=normal(batch, seq, heads, dk), lr=uniform(0.05, 0.4, batch, seq, heads, 3),
             momentum=uniform(0.3, 0.95, batch, seq, heads),
             forget=uniform(0.0, 0.2, batch, seq, heads) if forget else None)
    x = {n: None if t is None else jnp.asarray(t) for n, t in x.items()}
    x["w0"] = tuple(jnp.asarray(normal(*shape) / np.sqrt(shape[-1]))
                    for shape in ((heads, dh, dk), (heads, dk, dh), (heads, dh, dk)))
    return x


# ---------------------------------------------------------------------------------------------------------------
# reference: float64 numpy, per (batch, head), column vectors, token loop


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _f(w, u):
    a = w[0] @ u
    return u + w[1] @ (a * _sig(a) * (w[2] @ u))


def _token_grads(w, u, v, inner_loss):
    """dl/dW0, dl/dW1, dl/dW2 of one token, written from §3.4 with outer products (checked against autodiff in
    test_manual_inner_grads_match_autodiff through the op's batched version)."""
    a, b = w[0] @ u, w[2] @ u
    sg = _sig(a)
    s = a * sg
    g = s * b
    e = u + w[1] @ g - v if inner_loss == "mse" else -v
    dg = w[1].T @ e
    return np.outer(dg * b * sg * (1 + a * (1 - sg)), u), np.outer(e, g), np.outer(dg * s, u)


def _rownorm(w, rho):
    return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-5) * rho[:, None]


def reference_head(q, k, v, lr, mom, fg, w, m, rho, chunk, inner_loss, renorm):
    """One (batch, head): q, k, v [T, d], lr [T, 3], mom, fg [T]; w, m lists of matrices. Returns o [T, d], w, m."""
    outs, buf = [], []
    for t in range(q.shape[0]):
        outs.append(_f(w, q[t]))  # read with the weights of the last completed chunk
        buf.append(t)
        if len(buf) == chunk:
            wbar = [_rownorm(x, r) for x, r in zip(w, rho)] if renorm == "read_raw" else list(w)
            g = [np.zeros_like(x) for x in w]
            for j in buf:
                for i, gi in enumerate(_token_grads(wbar, k[j], v[j], inner_loss)):
                    g[i] += lr[j, i] * gi
            beta = np.mean(mom[buf])
            gamma = 1.0 if fg is None else 1.0 - np.mean(fg[buf])
            m = [beta * mi + gi for mi, gi in zip(m, g)]
            w = [gamma * wb - mi for wb, mi in zip(wbar, m)]
            if renorm == "post_write":
                w = [_rownorm(x, r) for x, r in zip(w, rho)]
            buf = []
    return np.stack(outs), w, m


def reference(q, k, v, lr, momentum, w0, forget=None, *, chunk, inner_loss="mse", renorm="read_raw", state=None):
    """Token-loop reference over the batch and heads in float64: (o [B, T, H, d], TTTState of numpy arrays)."""
    f64 = lambda t: None if t is None else np.asarray(t, np.float64)  # noqa: E731
    q, k, v, lr, momentum, forget = map(f64, (q, k, v, lr, momentum, forget))
    w0 = [f64(w) for w in w0]
    batch, seq, heads, d = q.shape
    out = np.zeros((batch, seq, heads, d))
    ws = [np.zeros((batch,) + w.shape) for w in w0]
    ms = [np.zeros((batch,) + w.shape) for w in w0]
    for b in range(batch):
        for h in range(heads):
            rho = [np.linalg.norm(x[h], axis=1) for x in w0]
            if state is None:
                w, m = [x[h] for x in w0], [np.zeros_like(x[h]) for x in w0]
            else:
                w, m = [f64(x[b, h]) for x in state.weights], [f64(x[b, h]) for x in state.momentum]
            out[b, :, h], w, m = reference_head(
                q[b, :, h], k[b, :, h], v[b, :, h], lr[b, :, h], momentum[b, :, h],
                None if forget is None else forget[b, :, h], w, m, rho, chunk, inner_loss, renorm)
            for i in range(3):
                ws[i][b, h], ms[i][b, h] = w[i], m[i]
    return out, TTTState(tuple(ws), tuple(ms))


def _close(a, b, tol, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)
    assert err < tol, f"{what}: relative max error {err:.3e} >= {tol}"


def _close_tree(a, b, tol, what=""):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b))):
        _close(x, y, tol, f"{what}[{i}]")


# ---------------------------------------------------------------------------------------------------------------
# tests


NAMES = ("q", "k", "v", "lr", "momentum")


@functools.lru_cache(maxsize=None)
def _jitted(**kw):
    """One compiled ttt_mlp per option set (compiles dominate this file's run time)."""
    return jax.jit(functools.partial(ttt_mlp, **kw))


def run(x, lo=0, hi=None, **kw):
    """ttt_mlp on tokens [lo, hi) of the inputs `x`."""
    part = lambda t: None if t is None else t[:, lo:hi]  # noqa: E731
    return _jitted(**kw)(*(part(x[n]) for n in NAMES), x["w0"], forget=part(x.get("forget")))


@pytest.mark.parametrize("inner_loss", ["mse", "dot"])
def test_manual_inner_grads_match_autodiff(inner_loss):
    x = make_inputs(0, seq=16)
    batch, _, heads, _ = x["k"].shape
    ws = tuple(jnp.broadcast_to(w, (batch,) + w.shape) * 1.3 for w in x["w0"])
    got = inner_grads(ws, x["k"], x["v"], x["lr"], inner_loss)

    def f(w, u):  # f_W(u) for one head, one token
        return u + w[1] @ (jax.nn.silu(w[0] @ u) * (w[2] @ u))

    def weighted_loss(w, i):  # sum_{b,h,t} lr[b,t,h,i] * l_t: each (b, h) slice of the gradient is its own head
        ys = _batched_f(w, x["k"], f)
        vs = x["v"]
        per_token = 0.5 * jnp.sum((ys - vs) ** 2, -1) if inner_loss == "mse" else -jnp.sum(ys * vs, -1)
        return jnp.sum(x["lr"][..., i] * per_token)

    want = jax.jit(lambda w: tuple(jax.grad(weighted_loss)(w, i)[i] for i in range(3)))(ws)
    for i in range(3):
        scale = float(jnp.max(jnp.abs(want[i])))
        assert scale > 1e-2  # the check compares something
        np.testing.assert_allclose(got[i], want[i], rtol=1e-6, atol=1e-6 * scale)


def _batched_f(w, u, f):
    """f applied per (batch, head, token): w triple [B, H, out, in], u [B, T, H, d] -> [B, T, H, d]."""
    per_head = jax.vmap(f, (None, 0))                        # tokens
    per_bh = jax.vmap(jax.vmap(per_head, (0, 1), 1), (0, 0))  # heads (u's axis 2 after batch), then batch
    return per_bh(w, u)


@pytest.mark.parametrize("inner_loss,renorm,seq,forget", [
    ("mse", "read_raw", 40, False),     # unaligned: 5 chunks of 8, last partial chunk read only
    ("mse", "post_write", 32, False),   # aligned
    ("dot", "read_raw", 32, True),      # LaCT loss + forgetting
    ("dot", "post_write", 37, False),
])
def test_parallel_matches_token_loop_reference(inner_loss, renorm, seq, forget):
    x = make_inputs(1, seq=seq, forget=forget)
    kw = dict(chunk_size=8, inner_loss=inner_loss, renorm=renorm)
    o, state = run(x, output_final_state=True, **kw)
    o_ref, state_ref = reference(**x, chunk=8, inner_loss=inner_loss, renorm=renorm)
    _close(o, o_ref, 1e-5, "o")
    _close_tree(state, state_ref, 1e-5, "state")
    # the memory must matter: after the first chunk, outputs differ from reads of the untouched initial weights
    o_static, _ = reference(**{**x, "lr": np.zeros(x["lr"].shape)}, chunk=8, inner_loss=inner_loss, renorm=renorm)
    assert np.max(np.abs(np.asarray(o_ref)[:, 8:] - o_static[:, 8:])) > 1e-2
    if seq % 8 == 0:  # without output_final_state the unneeded last write is skipped; outputs are the same
        o2, none = run(x, **kw)
        assert none is None
        _close(o2, o, 1e-6, "o without final state")


@functools.lru_cache(maxsize=None)
def _jitted_step(**kw):
    return jax.jit(functools.partial(ttt_mlp_step, **kw))


@pytest.mark.parametrize("split", [0, 8, 13])
def test_prefill_then_decode_equals_parallel(split):
    x = make_inputs(2, seq=27, forget=True)
    kw = dict(chunk_size=8, inner_loss="mse", renorm="read_raw")
    o_par, state_par = run(x, output_final_state=True, **kw)
    if split:
        o_pre, state, pending = ttt_mlp_prefill(*(x[n][:, :split] for n in NAMES), x["w0"],
                                                forget=x["forget"][:, :split], **kw)
        assert int(pending.count) == split % 8
        outs = [o_pre]
    else:
        state = ttt_mlp_init_state(x["w0"], 2)
        pending = ttt_mlp_init_pending(x["w0"], 2, 8, with_forget=True)
        outs = []
    step = _jitted_step(**kw)
    xn = {n: np.asarray(x[n]) for n in NAMES + ("forget",)}  # numpy slicing: no eager op per position
    for pos in range(split, 27):
        o_t, state, pending = step(*(xn[n][:, pos] for n in NAMES), state, pending, jnp.int32(pos), x["w0"],
                                   forget_t=xn["forget"][:, pos])
        outs.append(o_t[:, None])
    _close(jnp.concatenate(outs, axis=1), o_par, 1e-5, "decoded outputs")
    _close_tree(state, state_par, 1e-5, "state")
    assert int(pending.count) == 27 % 8


def test_split_sequence_with_carried_state():
    x = make_inputs(3, seq=40)
    kw = dict(chunk_size=8, renorm="post_write", output_final_state=True)
    o_all, s_all = run(x, **kw)
    o1, s1 = run(x, 0, 16, **kw)
    o2, s2 = ttt_mlp(*(x[n][:, 16:] for n in NAMES), x["w0"], initial_state=s1, **kw)
    _close(jnp.concatenate([o1, o2], axis=1), o_all, 1e-5, "split outputs")
    _close_tree(s2, s_all, 1e-5, "split state")
    # the carried state also continues the reference (not only the op itself)
    o_ref, _ = reference(*(x[n][:, 16:] for n in NAMES), x["w0"], chunk=8, renorm="post_write", state=s1)
    _close(o2, o_ref, 1e-5, "second half vs reference")


def test_causality():
    x = make_inputs(4, seq=40)
    o = run(x, chunk_size=8)[0]
    for j in (5, 19, 39):
        y = dict(x, **{n: x[n].at[:, j].multiply(-1.7) for n in NAMES})
        o2 = run(y, chunk_size=8)[0]
        np.testing.assert_array_equal(o2[:, :j], o[:, :j])
        assert float(jnp.max(jnp.abs(o2[:, j:] - o[:, j:]))) > 1e-3  # the perturbation did reach later tokens


def test_outer_gradients_flow_through_inner_updates():
    x = make_inputs(5, batch=1, seq=28)
    args = tuple(x[n] for n in NAMES) + (x["w0"],)
    r = np.random.default_rng(50).standard_normal(x["q"].shape)

    def grads(args, detach=False, remat=True):
        def loss(*a):
            o = ttt_mlp(*a, chunk_size=8, detach_inner_grads=detach, checkpoint_chunks=remat)[0]
            return jnp.sum(o.astype(jnp.float32) * r.astype(np.float32))
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)

    g, g_plain = grads(args), grads(args, remat=False)
    names = NAMES + ("w0",)
    for name, a, b in zip(names, g, g_plain):
        for leaf in jax.tree.leaves(a):
            assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 1e-4, name
        _close_tree(a, b, 1e-5, f"d{name}: checkpointed vs plain autodiff")

    # directional derivatives against central differences of the float64 reference, one input at a time
    def ref_loss(a):
        return float(np.sum(reference(*a[:5], a[5], chunk=8)[0] * r))

    base = [jax.tree.map(lambda t: np.asarray(t, np.float64), a) for a in args]
    rng = np.random.default_rng(0)
    eps = 1e-5
    for i, name in enumerate(names):
        d = jax.tree.map(lambda t: rng.standard_normal(t.shape), base[i])
        plus, minus = list(base), list(base)
        plus[i] = jax.tree.map(lambda t, u: t + eps * u, base[i], d)
        minus[i] = jax.tree.map(lambda t, u: t - eps * u, base[i], d)
        fd = (ref_loss(plus) - ref_loss(minus)) / (2 * eps)
        analytic = sum(float(np.vdot(np.asarray(ga, np.float64), da))
                       for ga, da in zip(jax.tree.leaves(g[i]), jax.tree.leaves(d)))
        assert abs(fd - analytic) < 1e-4 * max(abs(fd), 1.0), (name, fd, analytic)

    # sanity contrast (ALLMEM §11.5): k, v, lr act only through the write, so cutting the inner gradient zeroes
    # them. Run in bf16 so the same compile also covers the bf16 backward (dtypes, finiteness).
    bf = tuple(a.astype(jnp.bfloat16) for a in args[:3]) + args[3:]
    g_cut = grads(bf, detach=True)
    assert all(g_cut[i].dtype == jnp.bfloat16 for i in range(3))
    for i in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(g_cut[i], np.float32), 0.0)
    for leaf in jax.tree.leaves((g_cut[0], g_cut[5])):  # q learns through the read, w0 through read and write
        leaf = np.asarray(leaf, np.float32)
        assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 1e-4


@pytest.mark.slow
def test_checkpointed_chunks_same_gradients_less_memory():
    """Remat of the chunk body changes nothing but memory (DESIGN.md pitfall 11)."""
    x = make_inputs(10, batch=1, seq=512, dk=16, dh=32)
    args = tuple(x[n] for n in NAMES) + (x["w0"],)

    def grad_fn(remat):
        loss = lambda *a: jnp.sum(ttt_mlp(*a, chunk_size=64, checkpoint_chunks=remat)[0] ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))

    _close_tree(grad_fn(True)(*args), grad_fn(False)(*args), 1e-5, "remat vs plain gradients")
    temp = [grad_fn(remat).lower(*args).compile().memory_analysis().temp_size_in_bytes for remat in (True, False)]
    assert temp[0] < temp[1], temp


def test_norm_invariant():
    x = make_inputs(6, seq=24)
    rho = row_norms(x["w0"])
    target = lambda norms: tuple(jnp.broadcast_to(r, n.shape) for r, n in zip(rho, norms))  # noqa: E731
    # post_write: row norms == rho right after every write (checked at each chunk end of a decode)
    kw = dict(chunk_size=8, inner_loss="mse", renorm="post_write")
    step = _jitted_step(**kw)
    xn = {n: np.asarray(x[n]) for n in NAMES}
    state, pending = ttt_mlp_init_state(x["w0"], 2), ttt_mlp_init_pending(x["w0"], 2, 8)
    for pos in range(24):
        _, state, pending = step(*(xn[n][:, pos] for n in NAMES), state, pending, jnp.int32(pos), x["w0"])
        if (pos + 1) % 8 == 0:
            norms = tuple(jnp.linalg.norm(w, axis=-1) for w in state.weights)
            _close_tree(norms, target(norms), 1e-4, f"post_write row norms after position {pos}")
    # read_raw: the raw weights drift from rho; the renormalised weights the gradient is taken at do not
    _, st = run(x, chunk_size=8, renorm="read_raw", output_final_state=True)
    norms = tuple(jnp.linalg.norm(w, axis=-1) for w in st.weights)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(norms, target(norms))) > 1e-2
    renormed = tuple(jnp.linalg.norm(w, axis=-1) for w in renormalize(st.weights, rho))
    _close_tree(renormed, target(renormed), 1e-4, "read_raw renormalised row norms")


def test_bf16_inputs_close_to_float32():
    x = make_inputs(7, seq=48, dk=16, dh=32)
    kw = dict(chunk_size=16, output_final_state=True)
    o32, s32 = run(x, **kw)
    xb = dict(x, **{n: x[n].astype(jnp.bfloat16) for n in ("q", "k", "v")})
    o16, s16 = run(xb, **kw)
    assert o16.dtype == jnp.bfloat16 and s16.weights[0].dtype == jnp.float32
    _close(o16, o32, 2e-2, "bf16 outputs")
    _close_tree(s16, s32, 2e-2, "bf16 state")
    # (the bf16 backward is exercised in test_outer_gradients_flow_through_inner_updates)


def test_normalize_qk_matches_prenormalised_inputs():
    x = make_inputs(8, seq=24)
    a = run(dict(x, q=x["q"] * 3.0, k=x["k"] * 0.2), chunk_size=8, normalize_qk=True)[0]
    b = run(x, chunk_size=8)[0]
    _close(a, b, 1e-5, "normalize_qk")


def test_bad_inputs_name_the_tensor():
    x = make_inputs(9, seq=16)
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="lr has shape"):
        ttt_mlp(*args[:3], args[3][..., :2], args[4], x["w0"], chunk_size=8)
    with pytest.raises(ValueError, match="momentum has shape"):
        ttt_mlp(*args[:4], args[4][:, :3], x["w0"], chunk_size=8)
    with pytest.raises(ValueError, match="inner_loss"):
        ttt_mlp(*args, x["w0"], chunk_size=8, inner_loss="l1")
    with pytest.raises(ValueError, match="renorm"):
        ttt_mlp(*args, x["w0"], chunk_size=8, renorm="pre")
    with pytest.raises(ValueError, match="chunk_size"):
        ttt_mlp(*args, x["w0"], chunk_size=0)
    with pytest.raises(ValueError, match="w0 shapes"):
        ttt_mlp(*args, (x["w0"][0], x["w0"][0], x["w0"][2]), chunk_size=8)
    with pytest.raises(ValueError, match=r"initial_state.weights\[0\]"):
        ttt_mlp(*args, x["w0"], chunk_size=8, initial_state=ttt_mlp_init_state(x["w0"], 3))
    with pytest.raises(ValueError, match="no tokens"):
        ttt_mlp(*(a[:, :0] for a in args), x["w0"], chunk_size=8)
    with pytest.raises(ValueError, match="unknown impl"):
        ttt_mlp(*args, x["w0"], chunk_size=8, impl="nope")


def test_registered_in_dispatch():
    assert "chunk" in dispatch.available("ttt_mlp", "cpu")
    assert dispatch.resolve("ttt_mlp", "auto", backend="cpu").__name__ == "_ttt_chunk"
