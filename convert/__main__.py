"""`python -m convert import-hf HF_DIR OUT_DIR [--dtype bfloat16|float32]`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="convert a Hugging Face Qwen3-VL folder into an iada-jax checkpoint")
    imp.add_argument("hf_dir", help="folder with config.json and model.safetensors (or a sharded index)")
    imp.add_argument("out_dir", help="checkpoint folder to create (must not exist)")
    imp.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                     help="stored parameter dtype (default bfloat16, the released weights' dtype)")
    args = parser.parse_args(argv)

    from convert.import_hf import ConversionError, import_hf

    try:
        import_hf(args.hf_dir, args.out_dir, dtype=args.dtype)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
