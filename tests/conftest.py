"""Shared fixtures: tiny random Hugging Face Qwen3-VL models built in-process (no hub).

JAX is set up before anything imports it: float32 matmuls at full precision (the CPU
default already is, this makes it explicit for GPU runs), 8 fake CPU devices for the
sharding tests, and a fast-compiling CPU backend.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# LLVM optimisation level 0: the suite compiles hundreds of tiny programs, and compiling
# dominates its run time (about 30% less wall time); the numerics are XLA's HLO, unchanged.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

# Data indexes (data/index.py) cached for this run only, not in the user's ~/.cache.
os.environ["IADA_JAX_CACHE"] = tempfile.mkdtemp(prefix="iada-jax-test-cache-")
atexit.register(shutil.rmtree, os.environ["IADA_JAX_CACHE"], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A compilation cache for this run only (a fresh folder, removed at exit): the suite compiles
# the same training program in several tests (a run, its resumption, the sharded reference),
# and a hit skips XLA's backend compile (about 6 s per tiny training program here).
_COMPILE_CACHE = tempfile.mkdtemp(prefix="iada-jax-test-xla-cache-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

from iada_jax.embedded.tiny_hf import TEXT_VOCAB, build_hf_model, hf_config  # noqa: E402,F401


def pytest_sessionfinish(session, exitstatus):
    """In CI every test must run: a skip there is a failure (tests state why they skip)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") and reporter and reporter.stats.get("skipped"):
        session.exitstatus = 1


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop compiled programs after each test module. Thousands of live XLA CPU executables
    in one process crashed the compiler (a segfault in backend_compile, jaxlib 0.10.2)."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded default (tiny model with tokenizer, converted; 48 synthetic rows):
    (checkpoint folder, data file, tokenizer, loaded model)."""
    from transformers import AutoTokenizer

    import iada_jax
    from iada_jax.embedded import prepare_embedded

    cache = str(tmp_path_factory.mktemp("embedded"))
    ckpt, data = prepare_embedded(cache, num_rows=48, log=lambda *a: None)
    return ckpt, data, AutoTokenizer.from_pretrained(ckpt), iada_jax.load_pretrained(ckpt)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Factory: tiny_hf(name, **cfg) -> (folder, HF model); built once per name per session."""
    cache = {}

    def make(name="default", seed=0, **cfg_kwargs):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            cache[name] = (str(path), build_hf_model(path, seed=seed, **cfg_kwargs))
        return cache[name]

    return make


def hf_logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=None if mask is None else torch.as_tensor(mask),
            output_hidden_states=True,
            **kw,
        )
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def random_ids(rng, batch, seq):
    return rng.integers(0, TEXT_VOCAB, (batch, seq))


def pad_batch(rng, lengths, side):
    """Random ids with per-sample `lengths`, padded to the max on `side` ('left'|'right'|'none')."""
    t = max(lengths)
    ids = random_ids(rng, len(lengths), t)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, t - n:] = 1
        else:
            mask[b, :n] = 1
    return ids, mask
