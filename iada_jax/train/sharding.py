"""Device mesh and logical-axis rules: how parameters and batches are laid out on devices.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp`
(data parallel too, with the base parameters sharded along their hidden dimension: the frozen
base, or, when the base trains, its float32 master copy with its gradient sum and Adam
moments, `state_shardings`).
Model code never names mesh axes: each parameter gets logical axis names from its shape
here, and `RULES` maps logical names to mesh axes. A dimension the mesh axis does not
divide stays replicated. Adapters (LoRA, IADA) and their optimizer state are small and
replicated. Multi-host: `initialize_distributed()` calls `jax.distributed.initialize()`
when the launcher set the coordinator variables; every host builds the same global batch
and places only its own shards (`make_array_from_callback`), and reads replicated values
(metrics, adapters) from its own replica (`to_host`; a sharded one is gathered).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iada_jax.config import Qwen3VLConfig

MESH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (None = replicated)
RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",  # the text hidden size: every [.., d, ..] base weight is split over fsdp
    "vision_embed": "fsdp",
}


def initialize_distributed() -> None:
    """Multi-host start, when the launcher set JAX_COORDINATOR_ADDRESS (host:port of process 0)
    and, unless JAX detects the cluster itself (SLURM, Open MPI, ...), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. Must run before anything touches a device (asking jax.process_count()
    first would start the local backend, and initialize() then refuses). CPU processes
    exchange through gloo (JAX's default CPU collectives)."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address or jax.distributed.is_initialized():
        return
    kwargs = {name: int(os.environ[var]) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                           ("process_id", "JAX_PROCESS_ID")) if var in os.environ}
    jax.distributed.initialize(address, **kwargs)


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh; data=-1 takes all devices that fsdp leaves, otherwise the first
    data * fsdp devices are used."""
    n = jax.device_count()
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data < 1 or fsdp < 1 or data * fsdp > n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs more than the {n} devices available")
    return Mesh(np.asarray(jax.devices()[: data * fsdp]).reshape(data, fsdp), MESH_AXES)


def logical_axes(shape: tuple[int, ...], cfg: Qwen3VLConfig, vision: bool) -> tuple[str | None, ...]:
    """Logical names of a base parameter's dimensions: the hidden dimension is "embed"
    ("vision_embed" in the tower); the rest (layers, heads, mlp, vocab) have no rule."""
    hidden = cfg.vision.hidden_size if vision else cfg.text.hidden_size
    name = "vision_embed" if vision else "embed"
    axes: list[str | None] = [None] * len(shape)
    for i in range(len(shape) - 1, -1, -1):  # the last hidden-sized dim: kernels [.., in, d] split on d
        if shape[i] == hidden:
            axes[i] = name
            break
    return tuple(axes)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    out = []
    for name, size in zip(axes, shape):
        mesh_axes = RULES.get(name) if name else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            n = int(np.prod([mesh.shape[a] for a in names]))
            if size % n:
                mesh_axes = None
        out.append(mesh_axes)
    return PartitionSpec(*out)


def _base_sharding(path, x, cfg: Qwen3VLConfig, mesh: Mesh) -> NamedSharding:
    vision = any(getattr(k, "key", None) == "visual" for k in path)
    return NamedSharding(mesh, spec_for(logical_axes(x.shape, cfg, vision), x.shape, mesh))


def param_shardings(params: dict, cfg: Qwen3VLConfig, mesh: Mesh) -> dict:
    """NamedShardings for the base params (storage layout)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: _base_sharding(path, x, cfg, mesh), params)


def state_shardings(state: dict, cfg: Qwen3VLConfig, mesh: Mesh) -> dict:
    """NamedShardings for a train state (`TrainProgram.abstract_state`): every leaf of the base
    (under a "params" key: the trained master copy, its gradient sum, its Adam moments) laid out
    as `param_shardings` lays out the base; the rest (adapters and their state, counters)
    replicated. With a frozen base (no "params" in the state) everything is replicated."""

    def one(path, x):
        if any(getattr(k, "key", None) == "params" for k in path):
            return _base_sharding(path, x, cfg, mesh)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, batch_axis: int, ndim: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = RULES["batch"]
    return NamedSharding(mesh, PartitionSpec(*spec))


def place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global host array onto the mesh; each process places only its addressable shards."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def place_batch(batch, mesh: Mesh):
    """Shard the batch dimension of the token arrays; vision inputs are replicated."""
    def put(name, x, axis):
        return None if x is None else place(x, batch_sharding(mesh, axis, np.ndim(x)))

    rep = replicated(mesh)
    return batch.replace(
        input_ids=put("ids", batch.input_ids, 0),
        attention_mask=put("mask", batch.attention_mask, 0),
        loss_mask=put("loss", batch.loss_mask, 0),
        position_ids=put("pos", batch.position_ids, 1),
        segment_ids=put("segments", batch.segment_ids, 0),
        sample_lengths=put("samples", batch.sample_lengths, 0),
        vision=None if batch.vision is None else jax.tree.map(lambda a: place(a, rep), batch.vision),
        visual_index=None if batch.visual_index is None else place(batch.visual_index, rep),
    )


def to_host(x) -> np.ndarray:
    """An array as numpy: a replicated one read from this process's own replica (with several
    processes a global array spans devices no process can read); one sharded across processes
    (a trained base) gathered, which every process must then ask for together."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
