"""Conversions between Hugging Face / PEFT files and iada-jax:

    python -m convert import-hf HF_DIR OUT_DIR [--dtype auto|bfloat16|float32]
    python -m convert export-peft RUN_DIR OUT_DIR [--step N] [--model CKPT]
    python -m convert export-merged RUN_DIR OUT_DIR [--step N] [--model CKPT] [--dtype ...]
    python -m convert import-peft ADAPTER_DIR OUT_DIR --model CKPT
    python -m convert random-init --preset qwen3-vl-2b OUT_DIR [--format ours|hf] [--dtype ...]
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="convert a Hugging Face Qwen3-VL folder into an iada-jax checkpoint")
    imp.add_argument("hf_dir", help="folder with config.json and model.safetensors (or a sharded index)")
    imp.add_argument("out_dir", help="checkpoint folder to create (must not exist)")
    imp.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                     help="stored parameter dtype (default auto: the source's, bfloat16 for the released weights; "
                          "a float32 source stays float32)")

    for name, help_text in (("export-peft", "a run's LoRA as a PEFT adapter (+ IADA files and their PyTorch module)"),
                            ("export-merged", "a full HF checkpoint with the run's LoRA merged in (+ IADA files)")):
        exp = sub.add_parser(name, help=help_text)
        exp.add_argument("run_dir", help="a train.py run directory (or an adapters folder)")
        exp.add_argument("out_dir", help="folder to create (must not exist)")
        exp.add_argument("--step", type=int, default=None,
                         help="export checkpoints/<step> instead of the finished run's final adapters")
        exp.add_argument("--model", default=None,
                         help="the base checkpoint (default: the one recorded in the run's config.json)")
        if name == "export-merged":
            exp.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                             help="weight dtype (default: the base checkpoint's)")

    pin = sub.add_parser("import-peft", help="a PEFT LoRA adapter -> an adapters folder for train.py --init-adapters")
    pin.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    pin.add_argument("out_dir", help="adapters folder to create (must not exist)")
    pin.add_argument("--model", required=True, help="the base checkpoint the adapter is for (shapes are checked)")
    rnd = sub.add_parser("random-init", help="a random full-size checkpoint of a named architecture (benchmarks)")
    rnd.add_argument("out_dir", help="folder to create (must not exist)")
    rnd.add_argument("--preset", required=True, choices=["qwen3-vl-2b", "qwen3-vl-8b", "tiny"])
    rnd.add_argument("--format", dest="fmt", choices=["ours", "hf"], default="ours",
                     help="ours: a converted checkpoint for train.py --model (default); hf: safetensors for import-hf")
    rnd.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    rnd.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from convert.export import ExportError, export_merged, export_peft
    from convert.import_hf import ConversionError, import_hf
    from convert.import_peft import PeftImportError, import_peft
    from iada_jax.adapters import AdapterError

    try:
        if args.command == "import-hf":
            import_hf(args.hf_dir, args.out_dir, dtype=args.dtype)
        elif args.command == "export-peft":
            out = export_peft(args.run_dir, args.out_dir, step=args.step, model=args.model)
            print(f"wrote PEFT adapter {out}", file=sys.stderr)
        elif args.command == "export-merged":
            out = export_merged(args.run_dir, args.out_dir, step=args.step, model=args.model, dtype=args.dtype)
            print(f"wrote merged checkpoint {out}", file=sys.stderr)
        elif args.command == "random-init":
            from convert.random_init import random_init

            random_init(args.preset, args.out_dir, fmt=args.fmt, dtype=args.dtype, seed=args.seed)
        else:
            out = import_peft(args.adapter_dir, args.out_dir, args.model)
            print(f"wrote adapters folder {out}; train from it with train.py --init-adapters {out}", file=sys.stderr)
    except (ConversionError, ExportError, PeftImportError, AdapterError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
