"""Host-side image and video preprocessing: PIL -> `pixel_values` rows and `grid_thw`.

Mirrors `Qwen2VLImageProcessorPil` (transformers 5.23.0), which `AutoImageProcessor` maps
Qwen3-VL to: smart_resize to multiples of patch*merge within [min_pixels, max_pixels],
PIL bicubic resize on uint8, rescale 1/255, normalise, duplicate the frame on the temporal
axis, and emit patches in merge-window order. `min_pixels` / `max_pixels` are explicit
fields here: transformers 4.57's slow processor silently replaced a given `size` with its
defaults (QWEN3VL_REFERENCE.md, pitfall 9).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Defaults are the Qwen3-VL hub `preprocessor_config.json` (64 to 16384 LLM tokens per image);
    set `max_pixels` lower for training (lmms-eval's qwen3_vl uses 1605632)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        factor = self.patch_size * self.merge_size
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels={self.max_pixels} is below min_pixels={self.min_pixels}")
        if self.max_pixels < factor * factor:
            raise ValueError(f"max_pixels={self.max_pixels} is below one merged patch ({factor}x{factor} pixels)")

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "ImageProcessorConfig":
        """Read `preprocessor_config.json` from a model folder (HF or converted checkpoint)."""
        file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else path
        with open(file) as f:
            raw = json.load(f)
        size = raw.get("size") or {}
        fields = dict(
            patch_size=raw.get("patch_size", 16), temporal_patch_size=raw.get("temporal_patch_size", 2),
            merge_size=raw.get("merge_size", 2),
            min_pixels=size.get("shortest_edge", raw.get("min_pixels", 65536)),
            max_pixels=size.get("longest_edge", raw.get("max_pixels", 16777216)),
            image_mean=tuple(raw.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(raw.get("image_std", (0.5, 0.5, 0.5))),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Mirrors HF `smart_resize`: sides multiple of `factor`, area within the limits, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200 "
                         f"(image of {width}x{height})")
    h_bar = round(height / factor) * factor  # Python round: banker's rounding, as HF
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _normalized(image: Image.Image, height: int, width: int, cfg: ImageProcessorConfig) -> np.ndarray:
    """RGB, bicubic resize on uint8 (PIL), rescale, normalise in float32: [C, H, W]."""
    a = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC))
    a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescales in float64, then casts
    a = (a - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return a.transpose(2, 0, 1)


def _patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of temporal_patch_size) -> rows [t*gh*gw, C*tp*p*p], grid (t, gh, gw).

    Row order: per temporal step, merge windows row-major, the m x m patches inside each window;
    each row is (C, tp, y, x), the order the Conv3d patch embedding reads."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    n, c, h, w = frames.shape
    t, gh, gw = n // tp, h // p, w // p
    x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, bh, bw, mh, mw, C, tp, py, px
    return np.ascontiguousarray(x.reshape(t * gh * gw, c * tp * p * p)), (t, gh, gw)


def preprocess_image(image: Image.Image, cfg: ImageProcessorConfig,
                     raw: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One PIL image -> (pixel_values [gh*gw, C*tp*p*p] float32, grid (1, gh, gw)).

    The same values as `_patchify(stack([_normalized(image)] * tp))` (tested bit for bit), made
    the cheap way: the patches are cut from the uint8 image (a quarter of the bytes to move)
    and normalised through `normalize_table`. raw=True returns those uint8 rows of one temporal
    slice instead, [gh*gw, C*p*p] (an eighth of the bytes, host and transfer): the vision tower
    normalises them on the device through the same table (VisionInputs.pixel_table) and fills
    every temporal slice, to the same float32 rows."""
    height, width = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):  # PIL's resize to the same size is a copy
        image = image.resize((width, height), Image.BICUBIC)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    # Planar channels (PIL's split), then the patches: a patch row of p bytes moves as one
    # item (numpy's void type), 2x faster than transposing interleaved RGB byte by byte.
    planes = np.stack([np.frombuffer(ch.tobytes(), np.uint8) for ch in image.split()]).reshape(-1, height, width)
    c = planes.shape[0]
    rows = planes.view(f"V{p}").reshape(c, gh // m, m, p, gw // m, m)  # C, bh, mh, py, bw, mw
    u8 = np.ascontiguousarray(rows.transpose(1, 4, 2, 5, 0, 3)).view(np.uint8)  # bh, bw, mh, mw, C, py, px
    u8 = u8.reshape(gh * gw, c, p * p)
    if raw:  # one temporal slice: the tower writes a still image to all of them
        return u8.reshape(gh * gw, c * p * p), (1, gh, gw)
    out = np.empty((gh * gw, c, tp, p * p), np.float32)
    table = normalize_table(cfg)
    for ch in range(c):
        out[:, ch, 0] = table[ch][u8[:, ch]]
    out[:, :, 1:] = out[:, :, :1]
    return out.reshape(gh * gw, c * tp * p * p), (1, gh, gw)


def normalize_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """[C, 256] float32: what rescale-then-normalise (`_normalized`) makes of each byte value in
    each channel."""
    key = (tuple(cfg.image_mean), tuple(cfg.image_std))
    if key not in _TABLES:
        v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        _TABLES[key] = np.stack([(v - np.float32(mu)) / np.float32(sd) for mu, sd in zip(*key)]).astype(np.float32)
    return _TABLES[key]


_TABLES: dict = {}


def preprocess_images(images, cfg: ImageProcessorConfig, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A list of PIL images -> (pixel_values rows of all images, image_grid_thw [n, 3]); raw:
    uint8 rows (see preprocess_image).

    Errors name the image's index in the list."""
    rows, grids = [], []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {i}: expected a PIL.Image.Image, got {type(image).__name__}")
        try:
            pv, grid = preprocess_image(image, cfg, raw=raw)
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from None
        rows.append(pv)
        grids.append(grid)
    return (rows[0] if len(rows) == 1 else np.concatenate(rows)), np.asarray(grids, np.int64)


def preprocess_video(frames, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A list of PIL frames (already sampled) -> (pixel_values, grid (t, gh, gw)).

    All frames share the first frame's smart_resize size; the list is padded to a multiple
    of temporal_patch_size by repeating the last frame, and consecutive pairs fill the
    temporal slices. This is the layout `Qwen3VLVideoProcessor` produces, but its output was
    not compared here: that processor needs torchvision, which has no CPU wheel in this
    environment. Frame sampling (fps) and its min/max frame and pixel budgets are the
    caller's choice."""
    if not frames:
        raise ValueError("video: no frames")
    first = frames[0]
    height, width = smart_resize(first.height, first.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    arrays = [_normalized(f, height, width, cfg) for f in frames]
    arrays += [arrays[-1]] * (-len(arrays) % cfg.temporal_patch_size)
    return _patchify(np.stack(arrays), cfg)
