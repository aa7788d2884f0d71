"""Data: the `Batch` contract, and (later) readers, chat template, image processing, bucketing."""

from iada_jax.data.batch import Batch

__all__ = ["Batch"]
