"""The HF -> iada-jax converter: exact round trip, CLI, sharded files, and strict errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import hf_logits, random_ids

import iada_jax
from convert.__main__ import main as convert_main
from convert.import_hf import ConversionError, read_hf_params
from convert.mapping import export_to_hf, mapping_table
from convert.safetensors_io import load_tensor, read_header, write_safetensors
import jax

from iada_jax.checkpoint import read_base_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_tensors(folder) -> dict[str, np.ndarray]:
    entries = read_header(os.path.join(folder, "model.safetensors"))
    return {k: load_tensor(e) for k, e in entries.items()}


def copy_with(src, dst, tensors=None, config=None):
    """A copy of an HF folder with its tensors and/or config.json replaced."""
    shutil.copytree(src, dst)
    if tensors is not None:
        write_safetensors(os.path.join(dst, "model.safetensors"), tensors, {"format": "pt"})
    if config is not None:
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("name,kw", [("tied", dict(tied=True)),
                                     ("untied_bias", dict(tied=False, attention_bias=True, kv_heads=1, head_dim=16))])
def test_every_tensor_round_trips_exactly(tiny_hf, name, kw):
    path, _ = tiny_hf(f"rt_{name}", **kw)
    cfg, params = read_hf_params(path, dtype="float32")
    original = hf_tensors(path)
    exported = dict(export_to_hf(params, cfg))
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # The vision tower is carried in its final layout already (stacked blocks, matmul patch kernel).
    visual = params["model"]["visual"]
    assert visual["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
    assert visual["patch_embed"]["proj"]["kernel"].shape == (3 * 2 * 4 * 4, 32)
    assert visual["deepstack_merger_list"]["norm"]["scale"].shape == (2, 128)


def test_cli_import_then_load_matches_transformers(tiny_hf, tmp_path):
    path, hf = tiny_hf("cli", tied=False)
    src = copy_with(path, tmp_path / "hf")
    for aux in ("tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (tmp_path / "hf" / aux).write_text("{}")
    out = tmp_path / "ckpt"
    assert convert_main(["import-hf", src, str(out), "--dtype", "float32"]) == 0
    for aux in ("tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json", "config.json"):
        assert (out / aux).is_file(), aux
    ids = random_ids(np.random.default_rng(0), 2, 7)
    ref, _ = hf_logits(hf, ids)
    np.testing.assert_allclose(iada_jax.load_pretrained(out).logits(ids), ref, atol=1e-4)
    # An HF folder loads directly too, to the same numbers.
    np.testing.assert_allclose(iada_jax.load_pretrained(src).logits(ids), ref, atol=1e-4)


def test_bfloat16_checkpoint_stores_bfloat16(tiny_hf, tmp_path):
    path, _ = tiny_hf("default")
    out = tmp_path / "ckpt_bf16"
    assert convert_main(["import-hf", path, str(out), "--dtype", "bfloat16"]) == 0
    _, stored = read_base_checkpoint(str(out))
    q = stored["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == ml_dtypes.bfloat16
    ref = hf_tensors(path)["model.language_model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q[1], ref.T.astype(ml_dtypes.bfloat16))


def test_default_dtype_is_the_sources(tiny_hf, tmp_path):
    """--dtype auto (the default) never rounds: a float32 source stays float32 bit for bit, a
    bfloat16 one stays bfloat16."""
    path, _ = tiny_hf("default")
    assert convert_main(["import-hf", path, str(tmp_path / "f32")]) == 0
    _, stored = read_base_checkpoint(str(tmp_path / "f32"))
    q = stored["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    ref = hf_tensors(path)["model.language_model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == np.float32 and np.array_equal(q[1], ref.T)
    bf16 = copy_with(path, tmp_path / "bf16_src", tensors={k: v.astype(ml_dtypes.bfloat16)
                                                           for k, v in hf_tensors(path).items()})
    assert convert_main(["import-hf", bf16, str(tmp_path / "bf16")]) == 0
    _, stored = read_base_checkpoint(str(tmp_path / "bf16"))
    assert stored["model"]["language_model"]["norm"]["scale"].dtype == ml_dtypes.bfloat16


def test_conversion_holds_one_tensor_not_the_model(tmp_path):
    """import-hf streams: the Python heap's peak while converting (tracemalloc sees numpy's
    buffers) stays near the largest single tensor, far below the checkpoint's size; reading it
    back is lazy."""
    import tracemalloc

    from convert.import_hf import import_hf
    from convert.random_init import random_init

    cfg = iada_jax.Qwen3VLConfig.tiny(num_hidden_layers=6, hidden_size=128, intermediate_size=384)
    src = random_init(cfg, str(tmp_path / "hf"), fmt="hf", dtype="float32", verbose=False)
    sizes = [e.end - e.begin for e in read_header(os.path.join(src, "model.safetensors")).values()]
    tracemalloc.start()
    import_hf(src, str(tmp_path / "ours"), verbose=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"[convert] heap peak {peak / 1e6:.2f} MB; checkpoint {sum(sizes) / 1e6:.2f} MB, largest tensor "
          f"{max(sizes) / 1e6:.2f} MB")
    assert peak < 3 * max(sizes) + 2e5 and peak < 0.25 * sum(sizes)
    _, params = read_base_checkpoint(str(tmp_path / "ours"))
    from convert.safetensors_io import LazyTensor

    assert all(isinstance(x, LazyTensor) for x in jax.tree.leaves(params))


def test_sharded_checkpoint_converts(tiny_hf, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    path, hf = tiny_hf("default")
    sharded = tmp_path / "sharded"
    Qwen3VLForConditionalGeneration.from_pretrained(path).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    cfg, params = read_hf_params(str(sharded), dtype="float32")
    _, single = read_hf_params(path, dtype="float32")
    for (k, a), b in zip(sorted(dict(export_to_hf(params, cfg)).items()), sorted(dict(export_to_hf(single, cfg)).items())):
        np.testing.assert_array_equal(a, b[1], err_msg=k)


# ----------------------------------------------------------------------------- errors


def run_cli_expect_failure(src, out, capsys):
    code = convert_main(["import-hf", str(src), str(out), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code != 0
    assert not os.path.exists(out), "a failed conversion left its output folder"
    leftovers = [n for n in os.listdir(os.path.dirname(out)) if n.startswith(f".{os.path.basename(out)}")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    return err


def test_missing_key(tiny_hf, tmp_path, capsys):
    path, _ = tiny_hf("default")
    tensors = hf_tensors(path)
    del tensors["model.language_model.layers.2.mlp.up_proj.weight"]
    src = copy_with(path, tmp_path / "hf", tensors)
    err = run_cli_expect_failure(src, tmp_path / "out", capsys)
    assert "missing tensor 'model.language_model.layers.2.mlp.up_proj.weight'" in err


def test_extra_key(tiny_hf, tmp_path, capsys):
    path, _ = tiny_hf("default")
    tensors = hf_tensors(path)
    tensors["model.language_model.layers.0.mlp.extra_proj.weight"] = np.zeros((3, 3), np.float32)
    src = copy_with(path, tmp_path / "hf", tensors)
    err = run_cli_expect_failure(src, tmp_path / "out", capsys)
    assert "unexpected tensor 'model.language_model.layers.0.mlp.extra_proj.weight'" in err
    assert "model.safetensors" in err


def test_wrong_shape(tiny_hf, tmp_path, capsys):
    path, _ = tiny_hf("default")
    tensors = hf_tensors(path)
    key = "model.language_model.layers.3.self_attn.k_proj.weight"
    tensors[key] = tensors[key][:-1]
    src = copy_with(path, tmp_path / "hf", tensors)
    err = run_cli_expect_failure(src, tmp_path / "out", capsys)
    assert f"tensor '{key}' has shape [47, 64], config.json implies [48, 64]" in err


def test_truncated_file(tiny_hf, tmp_path, capsys):
    path, _ = tiny_hf("default")
    src = copy_with(path, tmp_path / "hf")
    file = os.path.join(src, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    err = run_cli_expect_failure(src, tmp_path / "out", capsys)
    assert f"{file}: truncated" in err


def test_unknown_model_type(tiny_hf, tmp_path, capsys):
    path, _ = tiny_hf("default")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    src = copy_with(path, tmp_path / "hf", config=dict(config, model_type="qwen2_5_vl"))
    err = run_cli_expect_failure(src, tmp_path / "out", capsys)
    assert "model_type='qwen2_5_vl' is not supported" in err


def test_all_problems_reported_together(tiny_hf, tmp_path):
    path, _ = tiny_hf("default")
    tensors = hf_tensors(path)
    del tensors["model.visual.merger.norm.bias"]
    tensors["model.language_model.norm.weight"] = np.ones(7, np.float32)
    tensors["stray"] = np.ones(1, np.float32)
    src = copy_with(path, tmp_path / "hf", tensors)
    with pytest.raises(ConversionError) as info:
        read_hf_params(src)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert any("model.visual.merger.norm.bias" in p for p in problems)
    assert any("model.language_model.norm.weight" in p for p in problems)
    assert any("'stray'" in p for p in problems)


def test_existing_output_folder_is_refused(tiny_hf, tmp_path, capsys):
    path, _ = tiny_hf("default")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_main(["import-hf", path, str(out)]) != 0
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_process_exit_code(tiny_hf, tmp_path):
    """The real entry point, in its own process: non-zero exit and the problem on stderr."""
    path, _ = tiny_hf("default")
    tensors = hf_tensors(path)
    del tensors["model.language_model.embed_tokens.weight"]
    src = copy_with(path, tmp_path / "hf", tensors)
    proc = subprocess.run([sys.executable, "-m", "convert", "import-hf", src, str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "missing tensor 'model.language_model.embed_tokens.weight'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_table_covers_every_hf_key(tiny_hf):
    """Every key transformers saves is claimed by exactly one rule (and no rule is unused)."""
    path, _ = tiny_hf("default")
    cfg = iada_jax.Qwen3VLConfig.from_hf_config(path)
    table_keys = [k for r in mapping_table(cfg) for k in r.hf_keys()]
    assert len(table_keys) == len(set(table_keys))
    assert set(table_keys) == set(hf_tensors(path))


def test_random_init_checkpoints_load_in_both_stacks_and_agree(tmp_path):
    """`convert random-init`: ours (train.py --model) and hf (from_pretrained, import-hf) hold the
    same random weights of the preset; the tokenizer's image id is the config's."""
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from convert.random_init import random_init

    ours = random_init("tiny", str(tmp_path / "ours"), dtype="float32", verbose=False)
    hf = random_init("tiny", str(tmp_path / "hf"), fmt="hf", dtype="float32", verbose=False)
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    a, b = iada_jax.load_pretrained(ours), iada_jax.load_pretrained(hf)
    assert a.config == b.config == iada_jax.Qwen3VLConfig.from_hf_config(hf)
    assert a.config.text == iada_jax.Qwen3VLConfig.tiny().text
    ids = np.asarray([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    with torch.no_grad():
        theirs = model.eval()(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(theirs - a.logits(ids)).max() < 1e-4
    tok = AutoTokenizer.from_pretrained(ours)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == a.config.image_token_id
    assert convert_main(["random-init", "--preset", "tiny", ours]) == 1  # an existing folder is refused
