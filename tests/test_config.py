"""Config parsing: both transformers config forms, and clear errors for what we cannot run."""

from __future__ import annotations

import json

import pytest
from conftest import hf_config

from iada_jax.config import ConfigError, ForwardConfig, Qwen3VLConfig


def v5_dict(**kw):
    return hf_config(**kw).to_dict()


def test_v5_and_457_forms_give_the_same_config():
    v5 = v5_dict(tied=False, mrope=(2, 5, 5))
    old = json.loads(json.dumps(v5))
    rope = old["text_config"].pop("rope_parameters")
    old["text_config"]["rope_theta"] = rope["rope_theta"]
    old["text_config"]["rope_scaling"] = {"rope_type": "default", "mrope_section": rope["mrope_section"],
                                          "mrope_interleaved": True}
    a, b = Qwen3VLConfig.from_hf_config(v5), Qwen3VLConfig.from_hf_config(old)
    assert a == b
    assert a.text.mrope_section == (2, 5, 5) and a.text.head_dim == 24 and not a.tie_word_embeddings
    assert a.vision.deepstack_visual_indexes == (0, 1) and a.image_token_id == 290


def test_real_2b_style_config_parses():
    cfg = {"model_type": "qwen3_vl", "tie_word_embeddings": True, "image_token_id": 151655,
           "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                           "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                           "head_dim": 128, "rope_theta": 5000000, "rms_norm_eps": 1e-6,
                           "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                            "rope_type": "default"}},
           "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                             "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]}}
    c = Qwen3VLConfig.from_hf_config(cfg)
    assert c.text.rope_theta == 5e6 and c.text.mrope_section == (24, 20, 20) and c.tie_word_embeddings
    assert c.vision.patch_dim == 1536 and c.vision.head_dim == 64
    ForwardConfig(block_size=4).check(c.text)  # the paper's S = 4 divides 28


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(model_type="llava"), "model_type='llava' is not supported"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type='yarn' is not supported"),
    (lambda c: c["text_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 5]), r"deepstack_visual_indexes \[5\]"),
    (lambda c: c.pop("text_config"), "missing key 'text_config'"),
])
def test_bad_configs_are_refused_clearly(change, message):
    cfg = v5_dict()
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_hf_config(cfg)


def test_missing_config_file_names_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: no config.json"):
        Qwen3VLConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize("preset", Qwen3VLConfig.PRESETS)
def test_presets_write_an_hf_config_that_reads_back_equal(preset):
    from transformers import Qwen3VLConfig as HFConfig

    cfg = Qwen3VLConfig.preset(preset)
    assert Qwen3VLConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert Qwen3VLConfig.from_hf_config(HFConfig(**cfg.to_hf_config()).to_dict()) == cfg  # through transformers
    with pytest.raises(ConfigError, match="unknown preset"):
        Qwen3VLConfig.preset("qwen3-vl-70b")
