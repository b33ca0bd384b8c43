"""Perplexity by position (vs a direct log-softmax), the efficiency report (vs eval.flops), and their PNG plots."""

import json

import jax
import numpy as np
import pytest

from ahn_jax.eval import efficiency as E
from ahn_jax.eval import flops as F
from ahn_jax.eval import perplexity as P
from ahn_jax.eval import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_token_nll_matches_log_softmax_across_chunks():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(37, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, size=37)
    expected = -np.asarray(jax.nn.log_softmax(logits[:-1], axis=-1))[np.arange(36), ids[1:]]
    for chunk in (1, 5, 36, 100):
        np.testing.assert_allclose(P.token_nll(logits, ids, chunk=chunk), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        P.token_nll(logits[:10], ids)
    # Lazy logits from hidden states and a head, chunk by chunk, give the same NLL.
    hidden = rng.normal(size=(37, 4)).astype(np.float32)
    head = rng.normal(size=(4, 11)).astype(np.float32)
    lazy = P.LazyLogits(hidden, lambda h: h @ head, 11)
    np.testing.assert_allclose(P.token_nll(lazy, ids, chunk=8), P.token_nll(hidden @ head, ids), rtol=1e-6)


def test_perplexity_by_position_buckets_and_variants(tmp_path):
    rng = np.random.default_rng(1)
    vocab = 13
    docs = [rng.integers(0, vocab, size=n) for n in (50, 23, 1)]  # the 1-token document is skipped
    table = rng.normal(size=(vocab, vocab)).astype(np.float32)

    def bigram(ids):  # a random bigram model: logits of row t depend on token t only
        return table[np.asarray(ids)]

    def uniform(ids):  # equal logits: perplexity is exactly the vocabulary size everywhere
        return np.zeros((len(ids), vocab), np.float32)

    result = P.perplexity_by_position(docs, {"bigram": bigram, "uniform": uniform}, bucket_size=16, chunk=7,
                                      log=lambda *_: None)
    assert result["documents"] == 2 and result["bucket_starts"] == [0, 16, 32, 48]
    np.testing.assert_allclose(result["variants"]["uniform"]["ppl"], vocab, rtol=1e-6)  # float32 log-sum-exp
    # Predicted positions 1..49 and 1..22: bucket b holds positions [16b, 16b + 16).
    assert result["variants"]["bigram"]["tokens"] == [15 + 15, 16 + 7, 16, 2]
    # Bucket 1 by hand: mean NLL over positions 16..31 of doc 0 and 16..22 of doc 1.
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
    nll = [-logp[d[t - 1], d[t]] for d in docs[:2] for t in range(16, min(32, len(d)))]
    assert result["variants"]["bigram"]["ppl"][1] == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    path = plots.plot_ppl_by_position(result, tmp_path / "ppl.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    json.dumps(result)  # JSON-serialisable as written by the CLI


def test_text_documents_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert list(P.text_documents(tmp_path)) == ["first", "second"]
    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"text": "x"}\n{"text": "y"}\n')
    assert list(P.text_documents(jl, limit=1)) == ["x"]
    jl.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="docs.jsonl:1"):
        list(P.text_documents(jl))


def test_efficiency_report_matches_flops_and_plots(tmp_path):
    shape = F.ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)
    lengths = [256, 1024, 4096]
    report = E.analytic_report(shape, lengths, window=96, sinks=32, variants=("full", "swa", "gated_deltanet"))
    for i, n in enumerate(lengths):
        table = F.cost_table(shape, n, window=96, sinks=32)
        for v in ("full", "swa", "gated_deltanet"):
            assert report["variants"][v]["model_flops"][i] == table[v]["model_flops"]
            assert report["variants"][v]["cache_bytes"][i] == table[v]["cache_bytes"]
    gdn = report["variants"]["gated_deltanet"]
    assert gdn["cache_bytes"][0] == gdn["cache_bytes"][-1]  # constant-size cache past the window
    assert gdn["cache_ratio"][-1] < gdn["cache_ratio"][0] < 1.0
    md = E.efficiency_markdown(report)
    assert "| gated_deltanet |" in md and "window 96, sinks 32" in md

    fn = jax.jit(lambda x: (x @ x.T).sum())
    measured = E.measured_report(lambda n: (fn, (jax.numpy.ones((n, 8)),)), [16, 32], repeats=2, log=lambda *_: None)
    for run in measured["runs"]:
        assert run["seconds_median"] > 0 and run["tokens_per_second"] > 0
        assert run["peak_bytes"] is None or run["peak_bytes"] > 0  # the CPU backend reports no memory stats
    path = plots.plot_efficiency(report, tmp_path / "eff.png", measured={"toy": measured})
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="lengths"):
        E.analytic_report(shape, [], window=96)
