"""The Pallas Mamba2 SSD kernel against the op's token-by-token reference, in interpret mode on CPU: output, final
state and the VJP of every input of ahn_jax.ops.ssd (x, dt, A, B, C, D, dt_bias, initial_states), for T not a multiple
of the chunk, with and without an initial state, groups G < H, a split head dimension and bf16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ahn_jax.ops import dispatch
from ahn_jax.ops import mamba_ssd as ssd_op
from pallas_kernels import ssd as kernel

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def _inputs(seed, b, t, h, g, p, n, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return dict(
        x=jnp.asarray(r.normal(size=(b, t, h, p)), dtype),
        dt=jnp.asarray(r.normal(size=(b, t, h)) - 1.0, dtype),
        A=-jnp.asarray(r.uniform(0.5, 3.0, size=(h,)), jnp.float32),
        # Unit-norm B, C as the AHN memory feeds them (L2-normalised k, q).
        B=jnp.asarray(r.normal(size=(b, t, g, n)) / np.sqrt(n), dtype),
        C=jnp.asarray(r.normal(size=(b, t, g, n)) / np.sqrt(n), dtype),
        D=jnp.asarray(r.normal(size=(h, p)), jnp.float32),
        dt_bias=jnp.asarray(r.normal(size=(h,)), jnp.float32),
        initial_states=jnp.asarray(r.normal(size=(b, h, p, n)), jnp.float32),
    )


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _op(impl, chunk, use_h0):
    def run(x, dt, A, B, C, D, dt_bias, initial_states):
        return ssd_op.ssd(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                          initial_states=initial_states if use_h0 else None, return_final_states=True, impl=impl)
    return run


# (seed, B, T, H, G, P, N, op chunk, use initial state). The op's chunk reaches the kernel as min(chunk, 64).
CASES = [
    (0, 1, 37, 4, 2, 16, 16, 16, True),   # T = 2 chunks + 5 (3 chunks), two heads per group, P split in halves (block_p 8 below)
    (1, 2, 32, 2, 2, 8, 16, 16, False),   # T a multiple of the chunk, one group per head, no initial state
]


@pytest.mark.parametrize("seed,b,t,h,g,p,n,chunk,use_h0", CASES)
def test_forward_and_every_vjp_match_the_recurrent_reference(seed, b, t, h, g, p, n, chunk, use_h0, monkeypatch):
    monkeypatch.setattr(kernel, "DEFAULT_BLOCK_P", 8)  # case 0 runs two programs per head, each with half the rows
    monkeypatch.setattr(kernel, "BWD_BLOCK_P", 8)  # and so does the chunk-parallel backward (its own P block)
    inp = _inputs(seed, b, t, h, g, p, n)
    args = tuple(inp[k] for k in NAMES)
    r = np.random.default_rng(100 + seed)
    cot_y = jnp.asarray(r.normal(size=(b, t, h, p)), jnp.float32)
    cot_s = jnp.asarray(r.normal(size=(b, h, p, n)), jnp.float32)

    def loss(impl):
        def f(*a):
            y, s = _op(impl, chunk, use_h0)(*a)
            return jnp.sum(y * cot_y) + jnp.sum(s * cot_s)
        return f

    y, s = jax.jit(_op("pallas", chunk, use_h0))(*args)
    y_ref, s_ref = _op("recurrent", chunk, use_h0)(*args)
    assert y.shape == y_ref.shape and s.shape == (b, h, p, n) and s.dtype == jnp.float32
    assert _rel(y, y_ref) < 1e-5, _rel(y, y_ref)
    assert _rel(s, s_ref) < 1e-5, _rel(s, s_ref)

    argnums = tuple(i for i, name in enumerate(NAMES) if use_h0 or name != "initial_states")
    # jit: interpret mode run eagerly dispatches every op of the kernel body one by one (slow on CPU).
    grads = jax.jit(jax.grad(loss("pallas"), argnums=argnums))(*args)
    grads_ref = jax.grad(loss("recurrent"), argnums=argnums)(*args)
    for i, got, want in zip(argnums, grads, grads_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, NAMES[i]
        assert np.all(np.isfinite(np.asarray(got))), NAMES[i]
        assert _rel(got, want) < 1e-4, (NAMES[i], _rel(got, want))


def test_bf16_inputs_match_the_float32_reference_loosely():
    """bf16 x, dt, B, C: float32 state and accumulation, y in bf16; gradients in the inputs' dtypes."""
    inp = _inputs(3, 1, 40, 2, 1, 16, 16, dtype=jnp.bfloat16)
    args = tuple(inp[k] for k in NAMES)
    args32 = tuple(a.astype(jnp.float32) for a in args)
    cot = jnp.asarray(np.random.default_rng(7).normal(size=(1, 40, 2, 16)), jnp.float32)
    y, s = jax.jit(_op("pallas", 16, True))(*args)
    y_ref, s_ref = _op("recurrent", 16, True)(*args32)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert _rel(y, y_ref) < 3e-2, _rel(y, y_ref)
    assert _rel(s, s_ref) < 3e-2, _rel(s, s_ref)

    def loss(impl, dtype):
        def f(x, dt, B, C):
            a = dict(zip(NAMES, args), x=x, dt=dt, B=B, C=C)
            y, s = _op(impl, 16, True)(*(a[k].astype(dtype) if k in ("x", "dt", "B", "C") else a[k] for k in NAMES))
            return jnp.sum(y.astype(jnp.float32) * cot) + jnp.sum(s)
        return f

    grads = jax.jit(jax.grad(loss("pallas", jnp.bfloat16), argnums=(0, 1, 2, 3)))(*(inp[k] for k in "x dt B C".split()))
    grads_ref = jax.grad(loss("recurrent", jnp.float32), argnums=(0, 1, 2, 3))(
        *(inp[k].astype(jnp.float32) for k in "x dt B C".split()))
    for name, got, want in zip(("x", "dt", "B", "C"), grads, grads_ref):
        assert got.dtype == jnp.bfloat16, name
        assert _rel(got, want) < 5e-2, (name, _rel(got, want))


def test_mamba2_head_sizes_p64_n64_forward():
    """The memory's real head shapes (P, N in {64, 128}) run through the kernel; one small case keeps CPU time low."""
    inp = _inputs(4, 1, 20, 1, 1, 64, 64)
    y, s = jax.jit(lambda x, dt, A, B, C, h0: kernel.ssd_scan(x, jax.nn.softplus(dt), A, B, C, initial_state=h0,
                                                              chunk_size=16, interpret=True))(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["initial_states"])
    y_ref, s_ref = ssd_op._ssd_recurrent(inp["x"], jax.nn.softplus(inp["dt"]), inp["A"], inp["B"], inp["C"],
                                         initial_states=inp["initial_states"])
    assert _rel(y, y_ref) < 1e-5 and _rel(s, s_ref) < 1e-5, (_rel(y, y_ref), _rel(s, s_ref))


def test_zero_initial_state_equals_none():
    inp = _inputs(5, 1, 12, 2, 2, 8, 8)
    d = jax.nn.softplus(inp["dt"])
    run = jax.jit(lambda h0: kernel.ssd_scan(inp["x"], d, inp["A"], inp["B"], inp["C"], initial_state=h0,
                                             chunk_size=8, interpret=True))
    y1, s1 = run(None)
    y2, s2 = run(jnp.zeros_like(inp["initial_states"]))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-6, atol=1e-6)


def test_bad_shapes_name_the_tensor():
    inp = _inputs(6, 1, 8, 2, 1, 8, 8)
    x, dt, A, B, C, h0 = (inp[k] for k in ("x", "dt", "A", "B", "C", "initial_states"))
    with pytest.raises(ValueError, match="d must"):
        kernel.ssd_scan(x, dt[:, :4], A, B, C, interpret=True)
    with pytest.raises(ValueError, match="initial_state"):
        kernel.ssd_scan(x, dt, A, B, C, initial_state=h0[:, :, :4], interpret=True)
    with pytest.raises(ValueError, match="block_p"):
        kernel.ssd_scan(x, dt, A, B, C, block_p=3, interpret=True)
    with pytest.raises(ValueError, match="groups"):
        kernel.ssd_scan(x[:, :, :1].repeat(3, axis=2), dt[:, :, :1].repeat(3, axis=2), jnp.ones(3), B.repeat(2, 2),
                        C.repeat(2, 2), interpret=True)


def test_dispatch_pallas_by_name_on_cpu_auto_on_gpu():
    assert "pallas" in dispatch.available("ssd", "cpu")
    assert "pallas" not in dispatch.ranked("ssd", "cpu")
    # On GPU "auto" takes the kernel (faster than the XLA chunk form on the H100, fwd and fwd+bwd).
    assert dispatch.ranked("ssd", "gpu")[0] == "pallas"
    assert "pallas" not in dispatch.available("ssd", "tpu")
