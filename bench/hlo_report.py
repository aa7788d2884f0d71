"""Look for avoidable work in the compiled training step (any backend; tiny dimensions on CPU).

    python -m bench.hlo_report --tiny --exp D_iada_lora --seq 256 [--dump step.hlo.txt]

Compiles train.py's training step (`TrainProgram`, as bench/train_step.py builds it) and counts, in the
optimised HLO: matrix products by operand dtypes (a float32 product of bf16 weights is an
upcast the policy does not ask for), converts and transposes by element count, and the
number of times each decoder-layer matmul shape occurs (forward, recompute under remat,
activation-gradient products: more copies than the remat policy implies is recompute we pay
for). It reports counts; whether a count is avoidable is read off against the policy.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* (\w+)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_STABLE_DOT = re.compile(r"stablehlo\.dot_general.*:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")


def _elements(dims: str) -> int:
    return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def _tensor_dtype(t: str) -> str:
    return t[:-1].split("x")[-1]


def inspect(hlo: str) -> dict:
    """Counts over the instructions of an optimised HLO module's text (operand dtypes are
    resolved through the instructions that define them)."""
    dtype_of: dict[str, str] = {}
    dots = collections.Counter()
    converts = collections.Counter()
    transposes = transpose_elements = 0
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op, rest = m.groups()
        dtype_of[name] = dtype
        operands = tuple(dtype_of.get(o, "?") for o in _OPERAND.findall(rest.split(")")[0]))
        if op in ("dot", "convolution"):
            dots[(dtype, operands[:2], dims)] += 1
        elif op == "convert":
            converts[(operands[0] if operands else "?", dtype)] += _elements(dims)
        elif op == "transpose":
            transposes += 1
            transpose_elements += _elements(dims)
    f32_of_bf16 = sum(n for (out, ops, _), n in dots.items() if "bf16" in ops and out == "f32")
    return {"dots": dots, "converts": converts, "transposes": transposes, "transpose_elements": transpose_elements,
            "dots_total": sum(dots.values()), "f32_results_of_bf16_products": f32_of_bf16}


def requested_products(stablehlo: str) -> collections.Counter:
    """What the program asks for before any backend pass: dot_general by (operand, operand ->
    result) dtypes. A float32 product here is ours (it would run in float32 on every backend)."""
    out = collections.Counter()
    for m in _STABLE_DOT.finditer(stablehlo):
        a, b, r = (_tensor_dtype(t) for t in m.groups())
        out[f"{a} x {b} -> {r}"] += 1
    return out


def compiled_step_text(args) -> tuple[str, str]:
    """(StableHLO as lowered, optimised HLO) of bench/train_step.py's step."""
    import jax

    from bench.train_step import Case, build_jax_case, model_config

    case = Case(exp=args.exp, seq=args.seq, images=args.images, batch=args.batch)
    program, state, frozen, batch = build_jax_case(model_config(args.tiny), case, args)
    lowered = program.step.lower(state, frozen, batch, jax.random.PRNGKey(1))
    return lowered.as_text(), lowered.compile().as_text()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hlo_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--exp", default="D_iada_lora")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--images", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--dump", help="also write the optimised HLO text here")
    args = ap.parse_args(argv)
    requested, text = compiled_step_text(args)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(text)
    print("requested matrix products (StableHLO, before backend passes), operand dtypes -> result:")
    for kind, n in requested_products(requested).most_common():
        print(f"  {kind}: {n}")
    report = inspect(text)
    print(f"optimised HLO on {__import__('jax').devices()[0].platform}:")
    print(f"matrix products: {report['dots_total']}; float32 results of bf16 operands: "
          f"{report['f32_results_of_bf16_products']}")
    print("products by (result dtype, operand dtypes, result shape): count")
    for (out, ops, dims), n in sorted(report["dots"].items(), key=lambda kv: -kv[1] * _elements(kv[0][2]))[:25]:
        print(f"  {out} <- {'x'.join(ops)} [{dims}]: {n}")
    print("converts (from -> to): elements")
    for (src, dst), n in sorted(report["converts"].items(), key=lambda kv: -kv[1]):
        print(f"  {src} -> {dst}: {n:,}")
    print(f"transposes: {report['transposes']} ({report['transpose_elements']:,} elements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
