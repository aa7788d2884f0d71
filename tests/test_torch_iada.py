"""The PyTorch IADA operator (iada_jax/torch_iada.py) against the JAX one, on the same weights:
every variant of the IADA tests, at every boundary (IADA_SPEC.md: "to float32 tolerance")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_iada import D, EPS, HEADS, N_BLOCKS, OPERATOR_VARIANTS, operator_inputs, random_iada_params

from convert.peft_format import flatten
from iada_jax.iada import DepthAggregation, TokenMasks
from iada_jax import torch_iada


def torch_module(cfg, params):
    settings = torch_iada.IadaSettings(hidden_size=D, num_attention_heads=HEADS,
                                       num_hidden_layers=N_BLOCKS * cfg.block_size, rms_norm_eps=EPS,
                                       image_token_id=1, video_token_id=2, **dataclasses.asdict(cfg))
    module = torch_iada.DepthAggregation(settings)
    module.load_state_dict({k: torch.tensor(v) for k, v in flatten(jax.tree.map(np.asarray, params)).items()})
    return module


@pytest.mark.parametrize("name", sorted(OPERATOR_VARIANTS))
def test_torch_operator_equals_jax_at_every_boundary(name):
    cfg = OPERATOR_VARIANTS[name]
    params = random_iada_params(cfg)
    masks, states = operator_inputs()
    tm = TokenMasks(**{k: jnp.asarray(v) for k, v in masks.items()})
    jax_module = DepthAggregation(cfg, D, HEADS, N_BLOCKS, EPS)
    module = torch_module(cfg, params)
    torch_masks = {k: torch.tensor(v) for k, v in masks.items()}
    for block in range(N_BLOCKS):
        n = block + 1
        buffer = states.copy()
        buffer[n:] = 0.0
        ours, _ = jax_module.apply({"iada": params}, jnp.asarray(states[n]), jnp.asarray(buffer), jnp.asarray(block), tm)
        with torch.no_grad():
            delta, _ = module.boundary(block, [torch.tensor(states[i]) for i in range(n + 1)], torch_masks,
                                       torch.arange(states.shape[2]))
        got = states[n] + delta.numpy()
        valid = masks["valid"]
        err = np.abs(np.asarray(ours)[valid] - got[valid]).max()
        assert err < 1e-5, f"{name}, boundary {n}: max |torch - jax| = {err:.2e}"
        np.testing.assert_array_equal(got[~valid], states[n][~valid])  # padding untouched


def test_settings_refuse_unknown_switches():
    with pytest.raises(ValueError, match="scope='later'"):
        torch_iada.IadaSettings(hidden_size=8, num_attention_heads=2, num_hidden_layers=4, rms_norm_eps=1e-6,
                                image_token_id=1, video_token_id=2, scope="later")


def test_settings_mirror_the_jax_config():
    """torch_iada.py copies IadaConfig (it must import without the package): same switches,
    same defaults, same choices."""
    from iada_jax.config import IADA_CHOICES, IadaConfig

    ours = {f.name: f.default for f in dataclasses.fields(torch_iada.IadaSettings)}
    for f in dataclasses.fields(IadaConfig):
        assert f.name in ours and ours[f.name] == f.default, f.name
    assert torch_iada.CHOICES == IADA_CHOICES
