"""Data: the `Batch` contract (batch.py), SFT rows (sft.py), the row index (index.py), image
processing, and the loader. `Batch` is imported on first use, so the index's worker processes
import no JAX."""


def __getattr__(name):
    if name == "Batch":
        from iada_jax.data.batch import Batch

        return Batch
    raise AttributeError(name)


__all__ = ["Batch"]
