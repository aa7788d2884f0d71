"""`load_pretrained` and `Qwen3VL`: the model as a user holds it (config + params + jitted forward)."""

from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iada_jax.checkpoint import is_base_checkpoint, read_base_checkpoint
from iada_jax.config import ForwardConfig, Qwen3VLConfig, param_dtype
from iada_jax.data.batch import Batch
from iada_jax.data.image_processing import ImageProcessorConfig
from iada_jax.data.vision_inputs import build_vision_inputs, merged_rows, scatter_index
from iada_jax.model.qwen3_vl import forward, vision_features
from iada_jax.positions import get_rope_index


class Qwen3VL:
    """A loaded Qwen3-VL: `logits(...)` has the meaning of HF `Qwen3VLForConditionalGeneration(...).logits`."""

    def __init__(self, config: Qwen3VLConfig, params: dict, fwd: ForwardConfig | None = None,
                 image_config: ImageProcessorConfig | None = None):
        """image_config: the preprocessing the model expects; when given, image and frame grids
        larger than its max_pixels are refused (an image that skipped preprocessing)."""
        self.config = config
        self.image_config = image_config
        self.fwd = fwd or ForwardConfig(block_size=_default_block_size(config.text.num_hidden_layers))
        self.fwd.check(config.text)
        self.params = jax.tree.map(jnp.asarray, params)

    # ------------------------------------------------------------------ host-side inputs
    def make_batch(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None) -> Batch:
        """Validate the inputs, compute M-RoPE positions and vision layouts on the host, build a `Batch`."""
        cfg = self.config
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a 2-D integer array [batch, seq], got shape {ids.shape} dtype {ids.dtype}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        for b in np.flatnonzero(mask.sum(-1) == 0):
            raise ValueError(f"sample {b}: attention_mask is all zeros (no tokens)")
        bad = np.argwhere(((ids < 0) | (ids >= cfg.text.vocab_size)) & (mask == 1))
        if len(bad):
            b, t = bad[0]
            raise ValueError(f"sample {b}, position {t}: token id {ids[b, t]} outside the vocabulary "
                             f"[0, {cfg.text.vocab_size})")
        for kind, pixels, grid in (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw)):
            if (pixels is None) != (grid is None):
                raise ValueError(f"pass {kind} pixels and their grid_thw together (got only one of them)")
        positions, _ = get_rope_index(
            ids, mask, image_grid_thw, video_grid_thw, image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
        )
        vision, visual_index = None, None
        if pixel_values is not None or pixel_values_videos is not None:
            vision, visual_index = self._vision_batch(ids, mask, pixel_values, image_grid_thw,
                                                      pixel_values_videos, video_grid_thw)
        return Batch(
            input_ids=jnp.asarray(np.where(mask == 1, ids, 0), jnp.int32),
            attention_mask=jnp.asarray(mask, jnp.int32),
            position_ids=jnp.asarray(positions, jnp.int32),
            vision=None if vision is None else jax.tree.map(jnp.asarray, vision),
            visual_index=None if visual_index is None else jnp.asarray(visual_index, jnp.int32),
        )

    def _vision_batch(self, ids, mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Pack images then videos into one vision sequence; the flat positions their tokens fill."""
        cfg, merge2 = self.config, self.config.vision.spatial_merge_size**2
        pixels, grids, index = [], [], []
        for kind, token, pv, grid in (("image", cfg.image_token_id, pixel_values, image_grid_thw),
                                      ("video", cfg.video_token_id, pixel_values_videos, video_grid_thw)):
            if pv is None:
                continue
            grid = np.asarray(grid, np.int64).reshape(-1, 3)
            positions = np.flatnonzero((ids == token) & (mask == 1))  # row-major, as HF masked_scatter
            self._check_grid_sizes(kind, grid, positions, ids.shape[1])
            need = int(grid.prod(-1).sum()) // merge2
            if len(positions) != need:
                raise ValueError(f"{kind}s: the batch has {len(positions)} {kind} placeholder tokens but "
                                 f"{kind}_grid_thw describes {need} merged {kind} tokens")
            pixels.append(np.asarray(pv, np.float32))
            grids.append(grid)
            index.append(positions)
        grid = np.concatenate(grids)
        vision = build_vision_inputs(np.concatenate(pixels), grid, cfg.vision)
        frame_len = vision.pixel_values.shape[0] // len(vision.frame_lengths)
        visual_index = scatter_index(np.concatenate(index), grid, frame_len, cfg.vision.spatial_merge_size,
                                     len(vision.frame_lengths), ids.size)
        return vision, visual_index

    def _check_grid_sizes(self, kind, grid, positions, seq_len):
        if self.image_config is None:
            return
        limit, patch = self.image_config.max_pixels, self.config.vision.patch_size
        tokens_per = grid.prod(-1) // self.config.vision.spatial_merge_size**2
        first_token = np.concatenate([[0], np.cumsum(tokens_per)[:-1]])
        for i, (t, h, w) in enumerate(grid):
            if h * w * patch * patch > limit:
                where = f"sample {positions[first_token[i]] // seq_len}, " if first_token[i] < len(positions) else ""
                raise ValueError(
                    f"{where}{kind} {i}: grid (t,h,w)=({t},{h},{w}) is {h * patch}x{w * patch} pixels per frame, above "
                    f"max_pixels={limit}; preprocess it with iada_jax.data.image_processing (which resizes within the "
                    "limit) or raise max_pixels in preprocessor_config.json"
                )

    # ------------------------------------------------------------------ forward
    @functools.cached_property
    def _jitted(self):
        return jax.jit(forward, static_argnames=("cfg", "fwd", "keep_hidden"))

    @functools.cached_property
    def _jitted_vision(self):
        return jax.jit(vision_features, static_argnames=("cfg", "fwd"))

    def _run(self, keep_hidden, input_ids, attention_mask, pixel_values, image_grid_thw,
             pixel_values_videos, video_grid_thw):
        batch = self.make_batch(input_ids, attention_mask, pixel_values, image_grid_thw,
                                pixel_values_videos, video_grid_thw)
        return self._jitted(self.params, batch, cfg=self.config, fwd=self.fwd, keep_hidden=keep_hidden)

    def vision_features(self, pixel_values, grid_thw) -> tuple[np.ndarray, list[np.ndarray]]:
        """The vision tower alone, as HF `get_image_features` before the per-image split:
        (merged tokens [sum(t*h*w)/4, D], one DeepStack feature [sum(t*h*w)/4, D] per tap)."""
        vis = build_vision_inputs(pixel_values, grid_thw, self.config.vision)
        frame_len = vis.pixel_values.shape[0] // len(vis.frame_lengths)
        rows = merged_rows(grid_thw, frame_len, self.config.vision.spatial_merge_size)  # the real tokens
        batch = Batch(input_ids=None, attention_mask=None, position_ids=None, vision=jax.tree.map(jnp.asarray, vis))
        merged, deepstack = self._jitted_vision(self.params, batch, cfg=self.config, fwd=self.fwd)
        return np.asarray(merged, np.float32)[rows], [np.asarray(d, np.float32)[rows] for d in deepstack]

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None) -> np.ndarray:
        """float32 [B, T, vocab]; values at padding positions are meaningless (as in HF)."""
        logits, _ = self._run(False, input_ids, attention_mask, pixel_values, image_grid_thw,
                              pixel_values_videos, video_grid_thw)
        return np.asarray(logits, dtype=np.float32)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                      pixel_values_videos=None, video_grid_thw=None) -> np.ndarray:
        """float32 [L + 1, B, T, D]: embeddings, then each decoder layer's output (before the final norm)."""
        _, hidden = self._run(True, input_ids, attention_mask, pixel_values, image_grid_thw,
                              pixel_values_videos, video_grid_thw)
        return np.asarray(hidden, dtype=np.float32)


def _default_block_size(num_layers: int) -> int:
    """The IADA default S = 4 where it divides L; else the largest divisor of L not above 4."""
    return max(s for s in range(1, 5) if num_layers % s == 0)


def load_config(path: str | os.PathLike) -> tuple[Qwen3VLConfig, ImageProcessorConfig | None]:
    """The model's config and image processing (preprocessor_config.json), reading no weights."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (expected a converted checkpoint or an HF model folder)")
    if is_base_checkpoint(path):
        config = Qwen3VLConfig.from_hf_config(read_base_checkpoint(path)[0])
    else:
        with open(os.path.join(path, "config.json")) as f:
            config = Qwen3VLConfig.from_hf_config(json.load(f))
    return config, _image_config(path)


def _image_config(path: str) -> ImageProcessorConfig | None:
    """The folder's preprocessor_config.json, if it has one."""
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return ImageProcessorConfig.from_pretrained(path)
    return None


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", fwd: ForwardConfig | None = None,
                    shardings: Callable[[Qwen3VLConfig, dict], dict] | None = None) -> Qwen3VL:
    """Load a converted checkpoint (from `python -m convert import-hf`) or an HF model folder.

    dtype: parameter and compute dtype, "float32" or "bfloat16". The parameters are read a leaf
    at a time, cast to dtype and put on the default device, or, given shardings(config, params)
    -> a tree of shardings, straight onto those (the training loop's mesh: each device receives
    only its shards).
    """
    path = os.fspath(path)
    target = param_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (expected a converted checkpoint or an HF model folder)")
    if is_base_checkpoint(path):
        hf_config, params = read_base_checkpoint(path)  # lazy: nothing is read yet
        config = Qwen3VLConfig.from_hf_config(hf_config)
    else:
        from convert.import_hf import lazy_hf_params

        config, params = lazy_hf_params(path)
    put = lambda x, s=None: jax.device_put(np.asarray(x).astype(target, copy=False), s)  # noqa: E731
    params = jax.tree.map(put, params) if shardings is None else jax.tree.map(put, params, shardings(config, params))
    if fwd is None:
        fwd = ForwardConfig(block_size=_default_block_size(config.text.num_hidden_layers), dtype=dtype)
    return Qwen3VL(config, params, fwd, _image_config(path))
