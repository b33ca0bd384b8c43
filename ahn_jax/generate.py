"""python -m ahn_jax.generate: chat with a model through the constant-size cache, streaming to stdout.

Examples
  python -m ahn_jax.generate --model Qwen2.5-3B-Instruct --memory gated_deltanet --ahn-weights ahn.safetensors \\
      --window 32640 --sinks 128 --prompt-file long_document.txt --max-new-tokens 256
  Full-attention teacher on the same prompt (growing KV cache):   add --teacher
  Sampling: --temperature 0.7 --top-p 0.9 --top-k 50 --seed 1      (default: greedy)

The prompt goes through the tokenizer's chat template as one user message (--no-chat sends the raw text). Prefill and
decode tokens/s are printed to stderr at the end.
"""

from __future__ import annotations

import argparse
import sys

MEMORIES = ("gated_deltanet", "deltanet", "mamba2", "ttt_mlp")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ahn_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory or an Orbax directory from convert")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--ahn-weights", help="AHN/AllMem-only checkpoint (ours or a released AHN safetensors file)")
    p.add_argument("--memory", choices=MEMORIES, help="memory type (default gated_deltanet when --ahn-weights is "
                   "given; without both, the window + sinks model with no memory)")
    p.add_argument("--window", type=int, help="sliding window (pure window, without the sinks); required unless "
                   "--teacher")
    p.add_argument("--sinks", type=int, default=0, help="attention-sink tokens (default 0)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file with the prompt text (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy-block", type=_positive_int, default=None,
                   help="greedy tokens per compiled device loop (default 16; 1 = one host call per token); the "
                        "text streams per block")
    p.add_argument("--stop", action="append", default=[], help="extra stop token (string); repeatable")
    p.add_argument("--teacher", action="store_true", help="full attention with a growing KV cache (no memory)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per prefill step (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    return p


def load_model(args):
    import ahn_jax
    from ahn_jax.models.hybrid_config import AHNConfig

    if args.teacher and args.window is None:
        return ahn_jax.load_pretrained(args.model, dtype=args.dtype)
    if args.window is None:
        raise SystemExit("error: --window is required (or pass --teacher for full attention)")
    memory = args.memory or "gated_deltanet"
    layers = None if (args.memory or args.ahn_weights) else ()  # no memory asked for: the window + sinks model
    try:
        ahn = AHNConfig(memory=memory, window=args.window, sinks=args.sinks, layers=layers)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return ahn_jax.load_pretrained(args.model, dtype=args.dtype, ahn=ahn, ahn_weights=args.ahn_weights)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise SystemExit(f"error: --prompt-file {args.prompt_file}: {e}")
    else:
        prompt = args.prompt
    from transformers import AutoTokenizer

    from ahn_jax.inference.generation import generate

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = load_model(args)

    def stream(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, stop_tokens=args.stop, stream=stream, seed=args.seed,
             chat=False if args.no_chat else None, teacher=args.teacher, chunk=args.prefill_chunk,
             greedy_block=args.greedy_block)
    sys.stdout.write("\n")
    return 0


class _CallableModule(type(sys)):
    """Importing this CLI module binds `ahn_jax.generate` to it, shadowing the public function of the same name;
    calling the module calls that function, so `ahn_jax.generate(model, tokenizer, prompt, ...)` works either way."""

    def __call__(self, *args, **kwargs):
        from ahn_jax.inference.generation import generate as _generate

        return _generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
