"""python -m ahn_jax.evaluate: long-context benchmarks, perplexity by position and efficiency reports.

Examples
  LongBench (AHN's 6 tasks, 128 sinks + 8064 window, memory):
    python -m ahn_jax.evaluate --model Qwen2.5-3B-Instruct --memory gated_deltanet --ahn-weights ahn.safetensors \\
        --window 8064 --sinks 128 --bench longbench --data LongBench/data --out runs/lb --max-length 32000
  Teacher (full attention) on the same data: add --variant teacher (window/sinks are then unused).
  Perplexity of teacher vs window-only vs memory on local text:
    python -m ahn_jax.evaluate --model M --memory gated_deltanet --ahn-weights F --window 1024 --sinks 32 \\
        --bench ppl --data books/ --out runs/ppl --max-length 32768 --ppl-variants teacher,window,memory
  Analytic FLOPs / cache report (plus measured time and peak memory on a GPU):
    python -m ahn_jax.evaluate --model M --memory gated_deltanet --window 32640 --sinks 128 --bench efficiency \\
        --out runs/eff --lengths 8192,32768,131072

Variants: "teacher" = the base model with full attention; "window" = sinks + sliding-window attention, no memory;
"memory" = window + the memory given by --memory (weights from --ahn-weights). Default: memory if --memory is given,
else window. Outputs go to <out>/<bench>/<variant>/ (predictions.jsonl, results.json, results.md); a rerun with the
same --out skips samples already in predictions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

BENCHES = ("longbench", "lveval", "infinitebench", "needle", "ppl", "efficiency")
MEMORIES = ("gated_deltanet", "deltanet", "mamba2", "ttt_mlp")
VARIANTS = ("teacher", "window", "memory")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ahn_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer) or "
                   "an Orbax directory written by `python -m ahn_jax.convert` (then give --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--ahn-weights", help="AHN/AllMem-only checkpoint (ours or a released AHN safetensors file)")
    p.add_argument("--memory", choices=MEMORIES, help="memory type of the student")
    p.add_argument("--variant", choices=VARIANTS, help="what to evaluate (default: memory if --memory, else window)")
    p.add_argument("--window", type=int, help="sliding window (pure window, without the sinks)")
    p.add_argument("--sinks", type=int, default=0, help="number of attention-sink tokens (default 0)")
    p.add_argument("--bench", required=True, choices=BENCHES)
    p.add_argument("--data", help="benchmark folder (JSONL files), or text/.jsonl documents for --bench ppl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-length", type=int, default=128000,
                   help="prompt budget in tokens: longer prompts keep their first and last halves (default 128000); "
                   "for ppl, documents are cut to this length")
    p.add_argument("--truncation", choices=("middle", "left"), default="middle",
                   help="middle = first half + last half (LongBench, LV-Eval); left = keep the last tokens")
    p.add_argument("--limit", type=int, help="at most N samples per dataset (or N documents for ppl)")
    p.add_argument("--datasets", help="comma-separated datasets (default: AHN's 6 LongBench tasks, LV-Eval's 11, "
                   "both InfiniteBench QA splits)")
    p.add_argument("--level", default="128k", help="LV-Eval length level in the file names (default 128k)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--decoder", choices=("auto", "cache", "reference"), default="auto",
                   help="cache = model.prefill/decode (constant-size cache); reference = greedy over full logits "
                   "(slow, tests only); auto = cache when the model has prefill/decode")
    p.add_argument("--needle-lengths", default="4096,16384", help="needle context lengths (tokens)")
    p.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--needle-per-cell", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-variants", default="teacher,window,memory", help="variants compared by --bench ppl")
    p.add_argument("--ppl-bucket", type=int, default=1024, help="position bucket size for --bench ppl")
    p.add_argument("--tfds", help="read ppl documents from this tensorflow-datasets name (e.g. pg19) instead of --data")
    p.add_argument("--tfds-split", default="test")
    p.add_argument("--lengths", default="4096,16384,32768,65536,131072", help="context lengths for --bench efficiency")
    p.add_argument("--measure", choices=("auto", "yes", "no"), default="auto",
                   help="time the forward pass and read peak device memory (auto: only on GPU/TPU)")
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _variant(args) -> str:
    variant = args.variant or ("memory" if args.memory else "window")
    if variant == "memory" and not args.memory:
        raise SystemExit("--variant memory needs --memory")
    if variant != "teacher" and args.window is None:
        raise SystemExit(f"--variant {variant} needs --window")
    return variant


# --- models ----------------------------------------------------------------------------------------------------------
def load_variant(args, variant: str):
    """The model of one variant: the base model (teacher) or the hybrid student (window-only or with memory)."""
    from ahn_jax.models.loading import load_pretrained

    if variant == "teacher":
        return load_pretrained(args.model, dtype=args.dtype)
    from ahn_jax.models.hybrid_config import AHNConfig

    if variant == "window":
        from ahn_jax.models.hybrid import HybridQwenForCausalLM

        # A hybrid with no memory layer is exactly sinks + window attention (the memory type is then irrelevant).
        ahn = AHNConfig(memory=args.memory or "gated_deltanet", window=args.window, sinks=args.sinks, layers=())
        return HybridQwenForCausalLM(load_pretrained(args.model, dtype=args.dtype), ahn)
    ahn = AHNConfig(memory=args.memory, window=args.window, sinks=args.sinks)
    return load_pretrained(args.model, dtype=args.dtype, ahn=ahn, ahn_weights=args.ahn_weights)


def jit_last_logits_fn(model):
    """(ids [1, T], position) -> logits [V] of that one position: hidden states, then the LM head on one row."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    def last(state, ids, position):
        m = nnx.merge(graphdef, state)
        h = jax.lax.dynamic_slice_in_dim(m.hidden_states(ids), position, 1, axis=1)
        return m.logits(h)[0, 0]

    fn = jax.jit(last)
    return lambda ids, position: fn(state, jax.numpy.asarray(ids, jax.numpy.int32), position)


def lazy_logits_fn(model):
    """ids [T] -> LazyLogits: jitted hidden states once, the LM head applied per chunk of rows by token_nll."""
    import jax
    from flax import nnx

    from ahn_jax.eval.perplexity import LazyLogits

    graphdef, state = nnx.split(model)
    hidden = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_states(ids)[0])
    head = jax.jit(lambda state, h: nnx.merge(graphdef, state).logits(h[None])[0])
    vocab = model.config.vocab_size
    return lambda ids: LazyLogits(hidden(state, jax.numpy.asarray(ids, jax.numpy.int32)[None]),
                                  lambda h: head(state, h), vocab)


def jit_hidden_fn(model):
    """ids [1, T] -> final hidden states (no LM head: [T, V] logits at 128k tokens would dwarf the model itself)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_states(ids))
    return lambda ids: fn(state, jax.numpy.asarray(ids, jax.numpy.int32))


def cached_greedy_generate_fn(model, eos_ids):
    """Greedy decoding through the public cache API: `model.prefill(ids [1, T]) -> (logits, cache)` and
    `model.decode(token [1, 1], cache) -> (logits, cache)` (DESIGN.md); logits [1, T, V] or [1, V]."""
    import numpy as np

    def last(logits):
        logits = np.asarray(logits)
        return int(np.argmax(logits[0, -1] if logits.ndim == 3 else logits[0]))

    def generate(prompt_ids, max_new_tokens):
        logits, cache = model.prefill(np.asarray([prompt_ids], np.int32))
        new = []
        for step in range(max_new_tokens):
            token = last(logits)
            new.append(token)
            if token in eos_ids or step == max_new_tokens - 1:
                break
            logits, cache = model.decode(np.asarray([[token]], np.int32), cache)
        return new

    return generate


def make_generate_fn(args, model, tokenizer):
    from ahn_jax.eval.runner import greedy_generate_fn

    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        eos_ids.add(im_end)  # chat models end their turn with <|im_end|>
    has_cache = hasattr(model, "prefill") and hasattr(model, "decode")
    if args.decoder == "cache" and not has_cache:
        raise SystemExit(f"--decoder cache: {type(model).__name__} has no prefill/decode yet")
    if has_cache and args.decoder != "reference":
        return cached_greedy_generate_fn(model, eos_ids), eos_ids
    return greedy_generate_fn(last_logits_fn=jit_last_logits_fn(model), eos_ids=eos_ids), eos_ids


def load_tokenizer(args):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer or args.model)


# --- benches ---------------------------------------------------------------------------------------------------------
def _samples(args, tokenizer):
    from ahn_jax.eval import tasks

    datasets = tuple(d.strip() for d in args.datasets.split(",")) if args.datasets else None
    if args.bench == "needle":
        return tasks.needle_samples(tokenizer, lengths=_ints(args.needle_lengths),
                                    depths=[float(x) for x in args.needle_depths.split(",")],
                                    per_cell=args.needle_per_cell, seed=args.seed)
    if not args.data:
        raise SystemExit(f"--bench {args.bench} needs --data (the folder holding its JSONL files)")
    if args.bench == "longbench":
        return tasks.longbench_samples(args.data, datasets or tasks.AHN_LONGBENCH, args.limit)
    if args.bench == "lveval":
        return tasks.lveval_samples(args.data, datasets or tasks.LVEVAL_DATASETS, args.level, args.limit)
    return tasks.infinitebench_samples(args.data, datasets or tasks.INFINITEBENCH_SPLITS, args.limit)


def run_generation_bench(args) -> dict:
    from ahn_jax.eval import runner, tasks

    variant = _variant(args)
    tokenizer = load_tokenizer(args)
    samples = _samples(args, tokenizer)
    model = load_variant(args, variant)
    generate, eos_ids = make_generate_fn(args, model, tokenizer)
    family = tasks.model_family(args.model)
    out = pathlib.Path(args.out) / args.bench / variant
    results = runner.run_benchmark(samples, generate, tokenizer, benchmark=args.bench, out_dir=out, family=family,
                                   max_length=args.max_length, truncation=args.truncation, eos_ids=eos_ids)
    print(runner.results_markdown(results, f"{args.bench} / {variant}"))
    return results


def run_ppl(args) -> dict:
    from ahn_jax.eval import perplexity, plots, runner

    tokenizer = load_tokenizer(args)
    if args.tfds:
        texts = perplexity.tfds_documents(args.tfds, split=args.tfds_split, limit=args.limit, data_dir=args.data)
    elif args.data:
        texts = perplexity.text_documents(args.data, limit=args.limit)
    else:
        raise SystemExit("--bench ppl needs --data (text files / .jsonl) or --tfds NAME")
    docs = list(perplexity.tokenize_documents(texts, tokenizer, args.max_length))
    fns = {}
    for variant in [v.strip() for v in args.ppl_variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            raise SystemExit(f"--ppl-variants: unknown variant {variant!r}; choose from {VARIANTS}")
        if variant == "memory" and not args.memory:
            print("skipping ppl variant 'memory' (no --memory given)")
            continue
        if variant != "teacher" and args.window is None:
            raise SystemExit(f"ppl variant {variant!r} needs --window")
        fns[variant] = lazy_logits_fn(load_variant(args, variant))
    result = perplexity.perplexity_by_position(docs, fns, bucket_size=args.ppl_bucket, max_length=args.max_length)
    result.update(window=args.window, sinks=args.sinks, memory=args.memory)
    out = pathlib.Path(args.out) / "ppl"
    out.mkdir(parents=True, exist_ok=True)
    runner._atomic_write(out / "results.json", json.dumps(result, indent=2) + "\n")
    table = ["| variant | overall ppl |", "|---|---:|"] + [f"| {k} | {v['overall_ppl']:.3f} |"
                                                              for k, v in result["variants"].items()]
    runner._atomic_write(out / "results.md", "\n".join(table) + "\n")
    plots.plot_ppl_by_position(result, out / "ppl_by_position.png",
                               title=f"Perplexity by position (window {args.window}, sinks {args.sinks})")
    print("\n".join(table))
    return result


def run_efficiency(args) -> dict:
    import jax

    from ahn_jax.eval import efficiency, flops, plots, runner

    if args.window is None:
        raise SystemExit("--bench efficiency needs --window")
    with open(os.path.join(args.model, "config.json")) as f:
        shape = flops.ModelShape.from_hf_config(json.load(f))
    variants = ("full", "swa") + ((args.memory,) if args.memory else ())
    lengths = _ints(args.lengths)
    report = efficiency.analytic_report(shape, lengths, window=args.window, sinks=args.sinks, variants=variants)
    measure = args.measure == "yes" or (args.measure == "auto" and jax.default_backend() != "cpu")
    measured = {}
    if measure:
        import numpy as np

        for variant in ("teacher", "window") + (("memory",) if args.memory else ()):
            fn = jit_hidden_fn(load_variant(args, variant))
            measured[variant] = efficiency.measured_report(
                lambda n, fn=fn: (fn, (np.ones((1, n), np.int32),)), lengths)
        report["measured"] = measured
    out = pathlib.Path(args.out) / "efficiency"
    out.mkdir(parents=True, exist_ok=True)
    runner._atomic_write(out / "report.json", json.dumps(report, indent=2) + "\n")
    runner._atomic_write(out / "report.md", efficiency.efficiency_markdown(report))
    plots.plot_efficiency(report, out / "efficiency.png", measured=measured or None)
    print(efficiency.efficiency_markdown(report))
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.bench == "ppl":
        return run_ppl(args)
    if args.bench == "efficiency":
        return run_efficiency(args)
    return run_generation_bench(args)


if __name__ == "__main__":
    main(sys.argv[1:])
