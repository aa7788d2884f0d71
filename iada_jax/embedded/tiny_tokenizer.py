"""A 300-id byte-level BPE tokenizer with Qwen3-VL's special tokens, for the tiny models.

Why: the tiny random models of `tiny_hf` have a 300-entry vocabulary (ordinary text ids below
TEXT_VOCAB=280, image/video/vision ids at 290..293), and the end-to-end pipeline (TRL-style
chat template -> placeholder expansion -> labels) needs a real tokenizer whose ids fit it.
Built with the `tokenizers` library only (no hub), trained on `synthetic.corpus_text()`.

Layout: ids 0..279 ordinary tokens (the 256 byte-level alphabet + 24 learned merges);
280 `<|endoftext|>` (pad), 281 `<|im_start|>`, 282 `<|im_end|>` (eos), 290 `<|image_pad|>`,
291 `<|video_pad|>`, 292 `<|vision_start|>`, 293 `<|vision_end|>`, 294 `<|vision_pad|>`;
the gaps 283..289 and 295..299 are `<|reserved_k|>` so the ids are contiguous. No BOS.

The chat template renders like the Qwen3-VL-*-Instruct template (reference notes section 3),
minus tools and thinking. transformers 5.x `save_pretrained` writes it to
`chat_template.jinja` (not into tokenizer_config.json) and `from_pretrained` reads it back.
"""

from __future__ import annotations

TEXT_VOCAB = 280  # must equal iada_jax.embedded.tiny_hf.TEXT_VOCAB
VOCAB = 300
SPECIAL_TOKENS = {
    "<|endoftext|>": 280, "<|im_start|>": 281, "<|im_end|>": 282,
    "<|image_pad|>": 290, "<|video_pad|>": 291, "<|vision_start|>": 292, "<|vision_end|>": 293,
    "<|vision_pad|>": 294,
}

# Qwen3-VL-Instruct template without the tool-calling branches. A system turn is emitted only
# when it is the first message (no default system prompt, unlike Qwen2/2.5-VL).
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role != 'system' or loop.first -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}"
    "{{- message.content -}}"
    "{%- else -%}"
    "{%- for content in message.content -%}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content.type == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


SPECIALS = VOCAB - TEXT_VOCAB  # the special block after the ordinary tokens


def special_token_layout(text_vocab: int = TEXT_VOCAB) -> list[str]:
    """Tokens of ids text_vocab .. text_vocab + 19 in order (280..299 by default), reserved
    fillers included."""
    by_id = {i - TEXT_VOCAB + text_vocab: t for t, i in SPECIAL_TOKENS.items()}
    out, k = [], 0
    for i in range(text_vocab, text_vocab + SPECIALS):
        if i not in by_id:
            by_id[i] = f"<|reserved_{k}|>"
            k += 1
        out.append(by_id[i])
    return out


def _train_bpe(corpus: str | None = None, text_vocab: int = TEXT_VOCAB):
    """Byte-level BPE of exactly `text_vocab` ordinary tokens (GPT-2 regex split, no prefix
    space: decode(encode(s)) == s), trained on `corpus` (default: the shapes data's text)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from iada_jax.embedded.synthetic import corpus_text

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab, min_frequency=2, special_tokens=[], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = corpus_text() if corpus is None else corpus
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    n = tok.get_vocab_size()
    if n != text_vocab:
        raise RuntimeError(f"BPE training gave {n} ordinary tokens, expected {text_vocab} (a corpus too small "
                           "for that many merges?)")
    return tok


def build_tokenizer(path: str, corpus: str | None = None, text_vocab: int = TEXT_VOCAB):
    """Build the tiny tokenizer, `save_pretrained` it to `path`, and return it. `corpus` and
    `text_vocab` give another vocabulary of the same layout (the special block at text_vocab;
    the reasoning-tax study's world); `tiny_hf.special_ids(text_vocab)` are its model ids.

    Reload with `transformers.AutoTokenizer.from_pretrained(path)`.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(corpus, text_vocab)
    layout = special_token_layout(text_vocab)
    # Added one by one, in id order: each gets the next free id (280, 281, ...).
    for t in layout:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    for i, t in enumerate(layout, start=text_vocab):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"{t} got id {tok.token_to_id(t)}, expected {i}")
    if tok.get_vocab_size() != text_vocab + SPECIALS:
        raise RuntimeError(f"vocabulary has {tok.get_vocab_size()} ids, expected {text_vocab + SPECIALS}")

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[t for t in layout if t not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # else decode turns "image ?" into "image?"
        model_max_length=32768,
        padding_side="right",
    )
    hf.save_pretrained(path)
    return hf
