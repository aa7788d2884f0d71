"""Evaluate a model (and trained adapters) on benchmarks: samples -> chat prompts -> answers
(greedy generation, or the option with the highest log-likelihood) -> the benchmark's score.

Prompts use the checkpoint's chat template (system prompt as lmms-eval's qwen3_vl model, the
images before the text of the user turn) and the same image preprocessing as training. Batches
are left-padded to power-of-two lengths and their images to power-of-two patch buckets, so a
benchmark compiles a few programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from iada_jax.data.loader import collate, next_pow2
from iada_jax.data.sft import BadRow, Example, build_example
from iada_jax.evaluation.reasoning import DEFAULT_REASONING_TAGS, strip_reasoning_tags
from iada_jax.evaluation.benchmark import Sample
from iada_jax.evaluation.generate import GenerationConfig, generate_batch
from iada_jax.model.qwen3_vl import forward
from iada_jax.train.loss import next_token_logprobs


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    mode: str = "generate"  # "loglik": multiple-choice samples by option log-likelihood
    max_length: int = 4096  # prompt tokens, images included; longer samples are scored as wrong
    max_new_tokens: int | None = None  # default: each benchmark's own budget
    system_prompt: str | None = "You are a helpful assistant."  # lmms-eval's qwen3_vl model
    limit: int | None = None
    min_pixels: int | None = None  # image size limits; None: the model's preprocessor_config.json
    max_pixels: int | None = None
    # Blocks cut from generated answers before scoring (lmms-eval 0.7.3's default); None: none.
    reasoning_tags: tuple[tuple[str, str], ...] | None = DEFAULT_REASONING_TAGS
    # "default": each task's default lmms-eval prompts; "qwen3_vl": the prompts lmms-eval gives its
    # qwen3_vl model where a task has its own (MMMU, MMStar; the others have none).
    prompt_style: str = "default"
    mathvista_prompt: str = "cot"  # benchmarks/mathvista.py VARIANTS
    mathvista_extractor: object = None  # prompt -> answer (judge.OpenAIExtractor); None: offline rules

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {self.prompt_style!r}: choose from {list(PROMPT_STYLES)}")


PROMPT_STYLES = ("default", "qwen3_vl")


def load_kwargs(bench, cfg: EvalConfig) -> dict:
    """What `bench.load` takes besides the source: the prompt style where the benchmark has
    several (PROMPT_STYLES), MathVista's prompt variant (VARIANTS)."""
    kwargs = {}
    if cfg.prompt_style in getattr(bench, "PROMPT_STYLES", ()):
        kwargs["prompt_style"] = cfg.prompt_style
    if hasattr(bench, "VARIANTS"):
        kwargs["variant"] = cfg.mathvista_prompt
    return kwargs


@functools.partial(jax.jit, static_argnames=("cfg", "fwd", "lora", "iada"))
def _option_logprobs(params, adapters, batch, *, cfg, fwd, lora, iada):
    """Sum of log p(token) over each row's loss_mask tokens (the option), [B]."""
    logits, _ = forward(params, batch, cfg=cfg, fwd=fwd, lora=lora, iada=iada, adapters=adapters)
    return (next_token_logprobs(logits, batch.input_ids) * batch.loss_mask[:, 1:]).sum(-1)


class Evaluator:
    """A loaded model with its tokenizer and adapters, answering benchmark samples."""

    def __init__(self, model, tokenizer, *, lora=None, iada=None, adapters=None, cfg: EvalConfig = EvalConfig(),
                 progress: bool = True):
        from iada_jax.data.image_processing import ImageProcessorConfig

        self.model, self.tokenizer, self.cfg, self.progress = model, tokenizer, cfg, progress
        self.image_config = model.image_config or ImageProcessorConfig()
        limits = {k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels)) if v is not None}
        self.image_config = dataclasses.replace(self.image_config, **limits)
        self.lora, self.iada, self.adapters = lora, iada, adapters
        stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
        self.stop_ids = tuple(sorted(int(s) for s in stops if s is not None and s >= 0))
        mc = model.config
        self.suppress = (mc.image_token_id, mc.video_token_id)

    # ------------------------------------------------------------------ prompts
    def _row(self, sample: Sample, completion: str) -> dict:
        prompt = [{"role": "user", "content": sample.prompt}]
        if self.cfg.system_prompt:
            prompt = [{"role": "system", "content": self.cfg.system_prompt}] + prompt
        return {"images": sample.images, "prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}

    def prompt_example(self, sample: Sample) -> Example:
        """The sample's prompt tokens up to the assistant turn (what the model continues)."""
        ex = build_example(self.tokenizer, self._row(sample, "x"), self.image_config,
                           self.model.config.vision.spatial_merge_size, self.cfg.max_length + 8)
        n = int(np.argmax(ex.loss_mask)) if ex.loss_mask.any() else len(ex.input_ids)
        if n > self.cfg.max_length:
            raise BadRow("too_long", f"the prompt is {n} tokens, max_length={self.cfg.max_length}")
        return dataclasses.replace(ex, input_ids=ex.input_ids[:n], loss_mask=np.zeros(n, np.int32))

    def _batch(self, examples: list[Example], side: str):
        length = next_pow2(max(len(e.input_ids) for e in examples), 32)
        frames = max(0 if e.image_grid_thw is None else int(e.image_grid_thw[:, 0].sum()) for e in examples)
        return collate(examples, length, self.model.config, next_pow2(frames, 1), side=side)

    # ------------------------------------------------------------------ answers
    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, dynamic_ncols=True, leave=False)

    def generate(self, samples: list[Sample], max_new_tokens: int, desc: str = "") -> list[str]:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=self.stop_ids, pad_token_id=-1,
                               suppress_token_ids=self.suppress)
        answers: list[str | None] = [None] * len(samples)
        prepared = self._prepare(samples, answers)
        bar = self._bar(len(prepared), desc)
        for start in range(0, len(prepared), self.cfg.batch_size):
            chunk = prepared[start:start + self.cfg.batch_size]
            batch = self._batch([ex for _, ex in chunk], side="left")
            tokens = generate_batch(self.model, batch, config=gen, lora=self.lora, iada=self.iada,
                                    adapters=self.adapters)
            for (i, _), row in zip(chunk, tokens):
                kept = [int(t) for t in row if t >= 0 and t not in self.stop_ids]
                answers[i] = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            bar.update(len(chunk))
        bar.close()
        return [a if a is not None else "" for a in answers]

    def choose(self, samples: list[Sample], desc: str = "") -> tuple[list[str], list[list[float]]]:
        """For samples with options: the option of highest log-likelihood after the prompt."""
        answers: list[str | None] = [None] * len(samples)
        logprobs: list[list[float]] = [[] for _ in samples]
        prepared = self._prepare(samples, answers)
        bar = self._bar(len(prepared), desc)
        for i, ex in prepared:
            rows = []
            for option in samples[i].options:
                ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
                rows.append(dataclasses.replace(
                    ex, input_ids=np.concatenate([ex.input_ids, np.asarray(ids, np.int32)]),
                    loss_mask=np.concatenate([np.zeros(len(ex.input_ids), np.int32), np.ones(len(ids), np.int32)])))
            batch = jax.tree.map(jnp.asarray, self._batch(rows, side="right"))
            scores = _option_logprobs(self.model.params, self.adapters, batch, cfg=self.model.config,
                                      fwd=self.model.fwd, lora=self.lora, iada=self.iada)
            logprobs[i] = [float(s) for s in np.asarray(scores)]
            answers[i] = samples[i].options[int(np.argmax(logprobs[i]))]
            bar.update(1)
        bar.close()
        return [a if a is not None else "" for a in answers], logprobs

    def _prepare(self, samples, answers) -> list[tuple[int, Example]]:
        """(index, prompt example) of every sample that fits; the others answer "" (wrong)."""
        out = []
        for i, s in enumerate(samples):
            try:
                out.append((i, self.prompt_example(s)))
            except BadRow as e:
                answers[i] = ""
                print(f"sample {s.id}: {e}; scored as wrong")
        return out

    # ------------------------------------------------------------------ one benchmark
    def run(self, bench, source: str, out_dir: str) -> dict:
        """Load, answer, score one benchmark; writes <out>/<name>/predictions.jsonl and scores.json.
        A benchmark with a SYSTEM_PROMPT of its own (the world's sets: None) is asked with it."""
        if not hasattr(bench, "SYSTEM_PROMPT"):
            return self._run(bench, source, out_dir)
        cfg = self.cfg
        self.cfg = dataclasses.replace(cfg, system_prompt=bench.SYSTEM_PROMPT)
        try:
            return self._run(bench, source, out_dir)
        finally:
            self.cfg = cfg

    def _run(self, bench, source: str, out_dir: str) -> dict:
        samples = bench.load(source, self.cfg.limit, **load_kwargs(bench, self.cfg))
        folder = os.path.join(out_dir, bench.NAME)
        os.makedirs(folder, exist_ok=True)
        logprobs = None
        if self.cfg.mode == "loglik" and all(s.options for s in samples):
            predictions, logprobs = self.choose(samples, desc=bench.TITLE)
        elif self.cfg.mode == "loglik":
            mc = [i for i, s in enumerate(samples) if s.options]
            predictions = self.generate(samples, self.cfg.max_new_tokens or bench.MAX_NEW_TOKENS, desc=bench.TITLE)
            chosen, lp = self.choose([samples[i] for i in mc], desc=bench.TITLE + " (options)")
            logprobs = [[] for _ in samples]
            for i, answer, scores in zip(mc, chosen, lp):
                predictions[i], logprobs[i] = answer, scores
        else:
            predictions = self.generate(samples, self.cfg.max_new_tokens or bench.MAX_NEW_TOKENS, desc=bench.TITLE)
        raw = predictions
        if self.cfg.reasoning_tags is not None:  # as lmms-eval, before the task's own extraction
            predictions = [strip_reasoning_tags(p, self.cfg.reasoning_tags) for p in predictions]
        extractor = self.cfg.mathvista_extractor if bench.NAME == "mathvista" else None
        scores = bench.score(samples, predictions, **({"extractor": extractor} if extractor else {}))
        if extractor is not None and hasattr(extractor, "describe"):
            scores["extraction"] = extractor.describe()
        with open(os.path.join(folder, "predictions.jsonl"), "w") as f:
            for i, (s, p) in enumerate(zip(samples, predictions)):
                record = {"id": s.id, "prompt": s.prompt, "prediction": p, "target": _jsonable(s.target)}
                if raw[i] != p:
                    record["raw_prediction"] = raw[i]
                if logprobs is not None and logprobs[i]:
                    record["option_logprobs"] = dict(zip(s.options, logprobs[i]))
                f.write(json.dumps(record) + "\n")
        with open(os.path.join(folder, "scores.json"), "w") as f:
            json.dump(_jsonable(scores), f, indent=1)
        return scores


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x
