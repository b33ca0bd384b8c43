"""Convert Qwen base weights between Hugging Face safetensors and ahn_jax's Orbax layout.

  python -m ahn_jax.convert --hf HF_DIR --out ORBAX_DIR [--dtype bfloat16]
  python -m ahn_jax.convert --to-hf --orbax ORBAX_DIR --out HF_DIR [--dtype bfloat16] [--max-shard-gb 5]
  python -m ahn_jax.convert --ahn-in AHN.safetensors --memory gated_deltanet --base HF_OR_ORBAX_DIR --out OUT.safetensors
      (an AHN-only checkpoint, ours or a released ByteDance-Seed AHN-*: checked name by name and shape by shape
       against the base model's dims, imported, and written back with the released names in --dtype)

Output is written to a temporary sibling directory and renamed on success; on any error no output directory is left.
config.json and tokenizer files are copied along. Weights are read one tensor at a time (no second host copy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

# Files copied next to the weights so the output directory stays usable with a tokenizer / generation settings.
_SIDE_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "generation_config",
                       "chat_template", "preprocessor_config")


def side_files(directory: str) -> list[str]:
    """Tokenizer and generation files of a checkpoint directory (not weights, not config.json)."""
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.startswith(_SIDE_FILE_PREFIXES) and os.path.isfile(os.path.join(directory, n)))


def _progress(desc: str):
    from tqdm import tqdm

    return lambda items: tqdm(list(items), desc=desc, unit="tensor")


def _new_output_dir(out: str) -> tuple[str, str]:
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} already exists; remove it or pick another directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return out, tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)


def hf_to_orbax(hf_dir: str, out: str, *, dtype: str = "bfloat16", progress=None) -> str:
    """HF checkpoint directory -> Orbax directory (params in `dtype`, config.json and tokenizer files copied)."""
    from ahn_jax.models.loading import load_hf, save_orbax

    out, tmp = _new_output_dir(out)
    try:
        model = load_hf(hf_dir, dtype=dtype, progress=progress or _progress("reading"))
        shutil.copy2(os.path.join(hf_dir, "config.json"), os.path.join(tmp, "config.json"))
        for path in side_files(hf_dir):
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        save_orbax(model, tmp)
        del model
        from ahn_jax.hf.export import chmod_like_mkdir

        chmod_like_mkdir(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def orbax_to_hf(orbax_dir: str, out: str, *, dtype: str | None = None, max_shard_bytes: int | None = None,
                progress=None) -> str:
    """Orbax directory written by hf_to_orbax -> HF checkpoint directory (safetensors + config.json + tokenizer)."""
    import json

    from ahn_jax.hf.export import DEFAULT_MAX_SHARD_BYTES, export_hf
    from ahn_jax.models.loading import MARKER_FILE, is_orbax_dir, load_orbax

    if not is_orbax_dir(orbax_dir):
        raise ValueError(f"--orbax {orbax_dir}: not an ahn_jax Orbax directory (no {MARKER_FILE})")
    if dtype is None:
        with open(os.path.join(orbax_dir, MARKER_FILE)) as f:
            dtype = json.load(f).get("dtype", "bfloat16")
    model = load_orbax(orbax_dir, dtype=dtype)
    return export_hf(model, out, max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                     extra_files=side_files(orbax_dir), progress=progress or _progress("writing shards"))


def ahn_roundtrip(ahn_in: str, base_dir: str, memory: str, out: str, *, dtype: str = "float32",
                  layers=None) -> str:
    """Import an AHN-only file into memories built for the base model at `base_dir`, and export them to `out`."""
    from flax import nnx

    from ahn_jax.hf.ahn_names import export_ahn_weights, import_ahn_weights
    from ahn_jax.models.config import QwenConfig
    from ahn_jax.models.hybrid_config import AHNConfig, build_memory

    config = QwenConfig.from_hf(base_dir)
    # window/sinks do not shape the memory parameters; the file's config.json values are never read (AHN.md §6).
    ahn = AHNConfig(memory=memory, window=1, layers=layers)
    rngs = nnx.Rngs(0)
    memories = {i: build_memory(ahn, config, i, rngs=rngs) for i in ahn.resolve_layers(config.num_hidden_layers)}
    import_ahn_weights(ahn_in, memories)
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} already exists; remove it or pick another path")
    export_ahn_weights(out, memories, dtype=dtype)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ahn_jax.convert",
        description="Convert Qwen2/2.5/3 base weights between Hugging Face safetensors and ahn_jax's Orbax layout. "
                    "Only safetensors are read; pickled .bin/.pt checkpoints are refused (re-save them with "
                    "transformers' save_pretrained(..., safe_serialization=True)).",
        epilog="Examples:\n  python -m ahn_jax.convert --hf ~/Qwen2.5-3B-Instruct --out ~/qwen3b-orbax\n"
               "  python -m ahn_jax.convert --to-hf --orbax ~/qwen3b-orbax --out ~/qwen3b-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_argument_group("base model weights")
    base.add_argument("--hf", metavar="DIR", help="input HF checkpoint directory (config.json + *.safetensors)")
    base.add_argument("--orbax", metavar="DIR", help="input Orbax directory written by this tool (with --to-hf)")
    base.add_argument("--to-hf", action="store_true", help="convert --orbax DIR back to an HF checkpoint directory")
    base.add_argument("--out", metavar="PATH", required=True,
                      help="output directory (or .safetensors file with --ahn-in); must not exist")
    base.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                      help="parameter dtype written (default: bfloat16 for --hf; the stored dtype for --to-hf)")
    base.add_argument("--max-shard-gb", type=float, default=5.0,
                      help="largest safetensors shard written by --to-hf, in GiB (default 5)")
    mem = parser.add_argument_group("AHN-only memory checkpoints (released names, spec/AHN.md §2.6)")
    mem.add_argument("--ahn-in", metavar="FILE", help="input AHN-only safetensors file or directory")
    mem.add_argument("--memory", choices=("gated_deltanet", "deltanet", "mamba2"),
                     help="which memory the file holds (with --ahn-in)")
    mem.add_argument("--base", metavar="DIR", help="the base model directory (HF or Orbax) whose dims the memory has")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.ahn_in:
            if not (args.memory and args.base):
                parser.error("--ahn-in needs --memory and --base")
            out = ahn_roundtrip(args.ahn_in, args.base, args.memory, args.out, dtype=args.dtype or "float32")
        elif args.to_hf:
            if not args.orbax or args.hf:
                parser.error("--to-hf needs --orbax DIR (and no --hf)")
            out = orbax_to_hf(args.orbax, args.out, dtype=args.dtype,
                              max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
        else:
            if not args.hf or args.orbax:
                parser.error("give --hf DIR (or --to-hf --orbax DIR)")
            out = hf_to_orbax(args.hf, args.out, dtype=args.dtype or "bfloat16")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

