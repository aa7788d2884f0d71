"""Named experiments: the paper's conditions A-D and every row of its ablation tables.

Each is a LoRA config and an IADA config (either may be absent), and whether the base model's
own weights train (`base`: every weight, the vision tower included; `full`, beyond the paper);
`train.py --exp NAME` runs one. `paper_iada_params` is the "AttnRes Params" figure the paper prints for the row (None
where it prints none); `python -m iada_jax.params` sets our counts beside it.
Rows are named by the paper's own words; tables list where a row appears (Table 9 repeats
the full benchmark breakdown of all of them).
"""

from __future__ import annotations

import dataclasses

from iada_jax.config import IadaConfig, LoraConfig


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    tables: tuple[str, ...]
    lora: LoraConfig | None = LoraConfig()
    iada: IadaConfig | None = IadaConfig()
    paper_iada_params: str | None = None
    note: str = ""
    base: bool = False  # every weight of the base trains (vision tower included), from a float32 master copy

    @property
    def trains(self) -> bool:
        return self.lora is not None or self.iada is not None or self.base


def _iada(**kw) -> IadaConfig:
    return IadaConfig(**kw)


_FIXED_ATTNRES_NOTE = (
    "the paper prints 0.10M for fixed AttnRes, which its text cannot produce: a fixed query is "
    "one d-vector per stream (2,048 here) and the retrieval has no K/V/O weights (IADA_SPEC.md)"
)

_EXPERIMENTS = [
    # Table 1: the four conditions.
    Experiment("A_pretrained", "A: pre-trained, no fine-tuning", ("Table 1",), lora=None, iada=None,
               paper_iada_params=None),
    Experiment("B_lora", "B: LoRA-only (rank 16, all linear layers)", ("Table 1", "Table 2", "Table 3", "Table 4", "Table 7"),
               iada=None, paper_iada_params=None),
    Experiment("C_attnres_lora", "C: fixed AttnRes + LoRA (fixed query, no modality split)",
               ("Table 1", "Table 2", "Table 4", "Table 7"), iada=_iada(query="fixed", routing="shared"),
               paper_iada_params="0.10M", note=_FIXED_ATTNRES_NOTE),
    Experiment("D_iada_lora", "D: IADA + LoRA (adaptive, self-modal, rank 16)",
               ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Table 7", "Table 8"),
               paper_iada_params="0.14M"),
    # Table 2 / 4: query type and modality conditioning.
    Experiment("adaptive_no_split", "Adaptive query, no modality split (shared routing)", ("Table 2", "Table 4"),
               iada=_iada(routing="shared"), paper_iada_params="0.07M"),
    Experiment("cross_modal", "Adaptive, cross-modal conditioning", ("Table 4",),
               iada=_iada(routing="cross_modal"), paper_iada_params="0.14M"),
    Experiment("text_only_adaptive", "Text-only adaptive (visual stream fixed)", ("Table 4",),
               iada=_iada(routing="text_only_adaptive"), paper_iada_params="0.07M"),
    Experiment("vision_only_adaptive", "Visual-only adaptive (text stream fixed)", ("Table 4",),
               iada=_iada(routing="vision_only_adaptive"), paper_iada_params="0.07M"),
    Experiment("shared_projection", "Shared projection (both streams, one W pair)", ("Table 4",),
               iada=_iada(shared_projection=True), paper_iada_params="0.07M"),
    # Table 3: LoRA capacity.
    Experiment("B_lora_r32", "B: LoRA-only, LoRA rank 32", ("Table 3",), lora=LoraConfig(r=32, lora_alpha=64.0),
               iada=None),
    Experiment("D_iada_lora_r32", "D: IADA + LoRA, LoRA rank 32", ("Table 3",), lora=LoraConfig(r=32, lora_alpha=64.0),
               paper_iada_params="0.14M"),
    # Table 5: bottleneck rank.
    Experiment("rank64", "Self-modal, rank 64", ("Table 5", "Table 9"), iada=_iada(rank=64), paper_iada_params="0.53M"),
    Experiment("rank256", "Self-modal, rank 256", ("Table 5", "Table 9"), iada=_iada(rank=256), paper_iada_params="2.1M"),
    Experiment("full_rank", "Self-modal, full rank (d x d)", ("Table 5", "Table 9"), iada=_iada(rank=None),
               paper_iada_params="8.4M"),
    # Table 6 / 8: secondary variations.
    Experiment("token_level", "Token-level routing, rank 16", ("Table 6", "Table 8"),
               iada=_iada(granularity="token"), paper_iada_params="0.14M"),
    Experiment("token_level_full_rank", "Token-level routing, full rank", ("Table 8",),
               iada=_iada(granularity="token", rank=None), paper_iada_params="8.4M"),
    Experiment("gelu_bottleneck", "Nonlinear (GELU) bottleneck, rank 16", ("Table 6", "Table 8"),
               iada=_iada(bottleneck="gelu"), paper_iada_params="0.14M"),
    Experiment("gelu_bottleneck_rank64", "Nonlinear (GELU) bottleneck, rank 64", ("Table 8",),
               iada=_iada(bottleneck="gelu", rank=64), paper_iada_params="0.53M"),
    Experiment("attention_pooling", "Attention pooling", ("Table 8",),
               iada=_iada(pooling="attention"), paper_iada_params="0.14M"),
    Experiment("attention_pooling_no_split", "Attention pooling + no modality split", ("Table 8",),
               iada=_iada(pooling="attention", routing="shared"), paper_iada_params="0.14M",
               note="one stream of rank 16 plus a pooling vector is 69,649 parameters (0.07M); the paper's "
                    "0.14M would need two streams, which 'no modality split' excludes"),
    Experiment("adaptive_gate", "Adaptive (input-dependent) gate", ("Table 6", "Table 8"),
               iada=_iada(gate="adaptive"), paper_iada_params="0.14M"),
    Experiment("rank4", "Extra-small rank 4", ("Table 6", "Table 8"), iada=_iada(rank=4), paper_iada_params="0.04M"),
    Experiment("rank8", "Extra-small rank 8", ("Table 8",), iada=_iada(rank=8), paper_iada_params="0.07M"),
    # Table 7: the path from fixed aggregation to IADA.
    Experiment("fixed_modality_aware", "Fixed query, modality-aware (one query per stream)", ("Table 7", "Table 9"),
               iada=_iada(query="fixed")),
    Experiment("fixed_modality_aware_per_block_gate", "Fixed query, modality-aware, + per-block gate",
               ("Table 7", "Table 9"), iada=_iada(query="fixed", gate="per_block")),
    # Beyond the paper: the scope and attend switches of IADA_SPEC.md.
    Experiment("D_full_scope", "D with the paper-literal full scope (context and memory see the answer)",
               ("beyond the paper",), iada=_iada(scope="full")),
    Experiment("D_causal_scope", "D with the causal scope (prefix context, causal memory)",
               ("beyond the paper",), iada=_iada(scope="causal")),
    Experiment("D_attend_depth", "D attending over depth per token (Attention Residuals style)",
               ("beyond the paper",), iada=_iada(attend="depth")),
    # Beyond the paper: training the base itself (a model trained from random initialisation).
    Experiment("full", "Full-parameter training: every weight of the base, vision tower included (no adapters)",
               ("beyond the paper",), lora=None, iada=None, base=True),
]

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in _EXPERIMENTS}


def get_experiment(name: str, block_size: int | None = None) -> Experiment:
    """The named experiment; `block_size` overrides the IADA block size S (default 4)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    if block_size is not None and exp.iada is not None:
        exp = dataclasses.replace(exp, iada=dataclasses.replace(exp.iada, block_size=block_size))
    return exp
