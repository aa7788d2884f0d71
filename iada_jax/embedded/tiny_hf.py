"""Tiny random Hugging Face Qwen3-VL models, built in-process (no hub): for tests and the demo.

Needs torch (the `test` extra). The randomisation replaces HF's init (norms at exactly 1,
weights of std 0.02) by O(1)-activation values, so a mis-mapped norm or projection changes
the logits measurably.
"""

from __future__ import annotations

import numpy as np

# Token ids of the tiny vocabulary: ordinary text ids stay below TEXT_VOCAB.
TEXT_VOCAB = 280


def special_ids(text_vocab: int = TEXT_VOCAB) -> dict[str, int]:
    """The vision token ids of a tiny vocabulary whose special block starts at `text_vocab`
    (tiny_tokenizer's layout)."""
    return dict(image_token_id=text_vocab + 10, video_token_id=text_vocab + 11,
                vision_start_token_id=text_vocab + 12, vision_end_token_id=text_vocab + 13)


SPECIAL_IDS = special_ids()


def hf_config(
    *, layers=4, hidden=64, heads=4, kv_heads=2, head_dim=24, mrope=(4, 4, 4), tied=True,
    attention_bias=False, intermediate=96, vocab=300, vision_depth=2, deepstack=(0, 1), merge=2,
    vision_hidden=32, vision_intermediate=64, vision_heads=2, text_vocab=TEXT_VOCAB,
):
    """A `transformers.Qwen3VLConfig` of a few-kilobyte model (same structure as the real ones);
    its vision token ids are `special_ids(text_vocab)`."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            attention_bias=attention_bias, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope),
                             "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
            num_heads=vision_heads, out_hidden_size=hidden,
            patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=list(deepstack),
            spatial_merge_size=merge,
        ),
        tie_word_embeddings=tied,
        **special_ids(text_vocab),
    )


def randomize_(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                scale = 1.0 if "embed_tokens" in name else fan_in**-0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))


def build_hf_model(path, seed: int = 0, **cfg_kwargs):
    """Build, randomize and `save_pretrained` a tiny Qwen3VLForConditionalGeneration at `path`."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(hf_config(**cfg_kwargs)).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model
