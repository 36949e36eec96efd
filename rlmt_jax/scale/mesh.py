"""The device mesh (data, fsdp, tensor), the one table of partition rules, and the multi-host start.

Every placement decision in rlmt-jax comes from `RULES` below: the models declare the *logical* axes of
every Param and activation ('embed', 'heads', 'batch', ...), and this module maps them onto the *mesh*
axes. A new sharding strategy is a new rules table, not a change to the models. Sampling has its own table,
`ROLLOUT_RULES`, on its own mesh over the same devices (`rollout_mesh`, the rollout.mesh setting).

Mesh axes:
  data    pure data parallelism: params replicated, batch split.
  fsdp    fully sharded data parallelism: params split (mostly on 'embed'), batch split.
  tensor  tensor parallelism: heads, kv_heads, mlp and vocab split.
On a multi-slice TPU (or several GPU hosts joined by a slower network) each mesh axis is the product of
an ICI part (inside a slice: `data`, `fsdp`, `tensor`) and a DCN part (across slices: `dcn_data`, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlmt_jax.settings.config import MeshConfig, RolloutMeshConfig  # the settings, defined once with the run config
from rlmt_jax.core.errors import UserError

__all__ = [
    "MESH_AXES", "ROLLOUT_RULES", "RULES", "AxisRule", "MeshConfig", "activation_constraint", "activation_sharding",
    "batch_sharding",
    "batch_split", "device_grid", "initialize_distributed", "is_main_process", "logical_to_spec", "make_mesh",
    "make_placer", "param_shardings", "per_device_map", "place_unplaced_params", "replicate_unplaced",
    "resolve_mesh_shape", "resolve_rollout_shape", "rollout_mesh", "shard_batch", "shard_params",
]

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class AxisRule:
    """Where one logical axis goes: `param` for weights (and optimizer state), `activation` for the rest."""

    param: MeshAxes
    activation: MeshAxes


# THE table. A mesh axis whose size does not divide a dimension is dropped for that dimension (see
# `logical_to_spec`): this is how kv_heads fewer than (or not a multiple of) the tensor size fall back
# to replication, and how a batch of 4 on data*fsdp = 8 devices stays whole. The only other rule lives
# in `_add_fsdp_fallback`: a param of 2+ dims (besides 'layers') with no dimension on 'fsdp' gets its
# largest free one.
RULES: Mapping[str, AxisRule] = {
    # params and activations
    "vocab": AxisRule(param="tensor", activation="tensor"),
    "embed": AxisRule(param="fsdp", activation=None),
    "heads": AxisRule(param="tensor", activation="tensor"),
    "kv_heads": AxisRule(param="tensor", activation="tensor"),
    "head_dim": AxisRule(param=None, activation=None),
    "mlp": AxisRule(param="tensor", activation="tensor"),
    # params only
    "norm": AxisRule(param=None, activation=None),
    "labels": AxisRule(param=None, activation=None),
    "layers": AxisRule(param=None, activation=None),
    # activations only
    "batch": AxisRule(param=None, activation=("data", "fsdp")),
    "seq": AxisRule(param=None, activation=None),
    "cache_seq": AxisRule(param=None, activation=None),
}


# The decode layout's table (rollout.mesh): the same logical axes, but no param is split on 'fsdp', so a
# device of a rollout mesh (data, 1, tensor) holds whole weights (tensor 1) or its tensor-parallel slice of them;
# the batch is split over 'data' (the rollout mesh's fsdp is 1).
ROLLOUT_RULES: Mapping[str, AxisRule] = {**RULES, "embed": AxisRule(param=None, activation=None)}


def _fill_sizes(sizes: Sequence[int], total: int, names: Sequence[str], what: str) -> tuple[int, ...]:
    """Replaces the one -1 in `sizes` so that their product is `total`; UserError naming the keys if impossible."""
    for name, size in zip(names, sizes):
        if size == 0 or size < -1:
            raise UserError(f"{name}={size}: a mesh size must be a positive integer or -1 (fill the rest)")
    free = [i for i, size in enumerate(sizes) if size == -1]
    if len(free) > 1:
        raise UserError(f"only one of {', '.join(names)} may be -1, got {[names[i] for i in free]}")
    given = " x ".join(f"{name}={size}" for name, size in zip(names, sizes))
    fixed = math.prod(size for size in sizes if size != -1)
    if free:
        if total % fixed:
            raise UserError(f"{given}: {fixed} does not divide the {total} {what}")
        filled = list(sizes)
        filled[free[0]] = total // fixed
        return tuple(filled)
    if fixed != total:
        raise UserError(
            f"{given} = {fixed}, but there are {total} {what}: make the product {total} or set one size to -1"
        )
    return tuple(sizes)


def resolve_mesh_shape(
    config: MeshConfig, num_devices: int, num_granules: int = 1
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ici_shape, dcn_shape) for `num_devices` devices in `num_granules` slices (or hosts), -1s filled.

    The mesh axis sizes are ici_shape * dcn_shape, elementwise.
    """
    if num_devices % num_granules:
        raise UserError(f"{num_devices} devices do not split evenly into {num_granules} slices")
    dcn = _fill_sizes(
        config.dcn_sizes, num_granules, ("mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_tensor"), "slices"
    )
    per_granule = num_devices // num_granules
    what = "devices" if num_granules == 1 else f"devices of each of the {num_granules} slices"
    ici = _fill_sizes(config.ici_sizes, per_granule, ("mesh.data", "mesh.fsdp", "mesh.tensor"), what)
    return ici, dcn  # type: ignore[return-value]


def _granules(devices: Sequence[Any]) -> tuple[int, bool]:
    """(number of slices or hosts, whether hosts are the granule). TPU: slices; elsewhere: processes."""
    if all(hasattr(device, "slice_index") for device in devices):
        return len({device.slice_index for device in devices}), False
    return len({device.process_index for device in devices}), True


def device_grid(config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """`devices` arranged as a [data, fsdp, tensor] array, neighbours on fast links (ICI inside a slice)."""
    num_granules, process_is_granule = _granules(devices)
    ici, dcn = resolve_mesh_shape(config, len(devices), num_granules)
    if math.prod(dcn) > 1:
        build = lambda split: mesh_utils.create_hybrid_device_mesh(  # noqa: E731
            ici, dcn, devices, process_is_granule=process_is_granule, allow_split_physical_axes=split
        )
    else:
        build = lambda split: mesh_utils.create_device_mesh(  # noqa: E731
            ici, devices, allow_split_physical_axes=split
        )
    try:
        return build(False)
    except (ValueError, NotImplementedError, AssertionError):
        # Some TPU topologies only fit a shape by splitting a physical axis across two mesh axes.
        return build(True)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all of them)."""
    grid = device_grid(config or MeshConfig(), list(jax.devices() if devices is None else devices))
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def split_devices(engine_per_process: int, devices: Sequence[Any] | None = None) -> tuple[list, list]:
    """Split placement (rollout.devices): (training devices, decode engine devices). Each process keeps its
    first devices (by id) for training and gives its last `engine_per_process` to the engine, so every host
    holds both (the weights go host-locally from one to the other) and each process's first device, where
    the processes agree (multihost.all_gather), trains. 0: (all devices, [])."""
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    if engine_per_process == 0:
        return devices, []
    per_process: dict[int, list] = {}
    for device in devices:
        per_process.setdefault(device.process_index, []).append(device)
    local = min(len(d) for d in per_process.values())
    if not 0 < engine_per_process < local:
        raise UserError(f"rollout.devices={engine_per_process}: each process has {local} devices; the engine takes "
                        f"between 1 and {local - 1} of them (0: colocated, the engine on every device)")
    training = [d for group in per_process.values() for d in group[:-engine_per_process]]
    engine = [d for group in per_process.values() for d in group[-engine_per_process:]]
    return training, engine


def engine_mesh(devices: Sequence[Any]) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of the engine's devices in order (rollout_mesh regroups it)."""
    grid = np.asarray(list(devices), object).reshape(-1, 1, 1)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def resolve_rollout_shape(config: RolloutMeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, tensor) of the decode layout over `num_devices` devices, the -1 filled."""
    data, tensor = _fill_sizes((config.data, config.tensor), num_devices,
                               ("rollout.mesh.data", "rollout.mesh.tensor"), "devices")
    return data, tensor


def rollout_mesh(mesh: Mesh, config: RolloutMeshConfig) -> Mesh:
    """The decode layout's ('data', 'fsdp', 'tensor') mesh of shape (data, 1, tensor) over `mesh`'s devices, in
    `mesh`'s order: a tensor group is `tensor` consecutive devices of the training mesh (neighbours on fast
    links), and a program can take arrays of both meshes (the same device assignment).

    UserError if a tensor group would span processes (its reductions would cross the slow network, and a
    process would not own whole rows)."""
    devices = np.asarray(mesh.devices).reshape(-1)
    data, tensor = resolve_rollout_shape(config, devices.size)
    grid = devices.reshape(data, 1, tensor)
    for group in grid[:, 0, :]:
        if len({device.process_index for device in group}) > 1:
            raise UserError(f"rollout.mesh.tensor={tensor}: a tensor group of {tensor} devices would span "
                            "processes; use a tensor size that divides each process's devices")
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _rule(axis: str | None, kind: str, rules: Mapping[str, AxisRule]) -> tuple[str, ...]:
    if axis is None:
        return ()
    if axis not in rules:
        raise ValueError(f"logical axis {axis!r} has no partition rule; known: {sorted(rules)}")
    mesh_axes = getattr(rules[axis], kind)
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _add_fsdp_fallback(
    chosen: list[tuple[str, ...]], axes: Sequence[str | None], shape: Sequence[int], mesh_sizes: Mapping[str, int]
) -> None:
    """A param of 2+ dims besides 'layers' that has no dimension on 'fsdp' (no 'embed', or 'embed' not
    divisible) is FSDP-sharded on its largest free dimension (not 'layers') divisible by the fsdp size.
    Vectors (norm scales, 1-dim biases), scanned or not, stay as their rule says."""
    fsdp = mesh_sizes["fsdp"]
    dims = [i for i, axis in enumerate(axes) if axis != "layers"]
    if fsdp == 1 or len(dims) < 2 or any("fsdp" in dim_axes for dim_axes in chosen):
        return
    free = [i for i in dims if not chosen[i] and shape[i] % fsdp == 0]
    if free:
        largest = max(free, key=lambda i: (shape[i], -i))
        chosen[largest] = ("fsdp",)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    kind: str = "param",
    rules: Mapping[str, AxisRule] = RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions have logical names `axes`.

    kind: 'param' (weights, optimizer state) or 'activation'. For each dimension the rule's mesh axes are
    kept in order while their product divides the dimension; a mesh axis that would not divide it (or is
    already used by an earlier dimension) is dropped, so that dimension is replicated over it. Mesh axes
    of size 1 split nothing and are left out, so the spec shows only real splits.
    """
    if kind not in ("param", "activation"):
        raise ValueError(f"kind must be 'param' or 'activation', got {kind!r}")
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    mesh_sizes = dict(mesh.shape)
    used: set[str] = set()
    chosen: list[tuple[str, ...]] = []
    for axis, size in zip(axes, shape):
        kept: list[str] = []
        for mesh_axis in _rule(axis, kind, rules):
            split = math.prod(mesh_sizes[a] for a in kept) * mesh_sizes[mesh_axis]
            if mesh_sizes[mesh_axis] > 1 and mesh_axis not in used and size % split == 0:
                kept.append(mesh_axis)
                used.add(mesh_axis)
        chosen.append(tuple(kept))
    if kind == "param" and any("fsdp" in _rule(axis, "param", rules) for axis in rules):  # tables that use fsdp
        _add_fsdp_fallback(chosen, axes, shape, mesh_sizes)
    entries = [None if not dim_axes else dim_axes[0] if len(dim_axes) == 1 else dim_axes for dim_axes in chosen]
    return PartitionSpec(*entries)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path: Sequence[Any]) -> str:
    return ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def param_shardings(state: Any, mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Any:
    """NamedShardings for a pytree of nnx Variables (a Param State, abstract or real, or optax state of one).

    Each Variable keeps its place and metadata with a NamedSharding as its value, so the result can be
    given to `jax.device_put` or to `jax.jit(out_shardings=...)` for the same tree. Params take their
    spec from their 'logical_axes' metadata; other leaves (step counters, rng keys) are replicated.
    """

    def sharding_of(path: Sequence[Any], leaf: Any) -> Any:
        if not _is_variable(leaf):
            return NamedSharding(mesh, PartitionSpec())
        axes = leaf.get_metadata().get("logical_axes")
        if axes is None:
            if isinstance(leaf, nnx.Param):
                raise ValueError(f"param {_path_name(path)} has no 'logical_axes' metadata")
            return leaf.replace(NamedSharding(mesh, PartitionSpec()))
        shape = leaf.get_value().shape
        try:
            spec = logical_to_spec(axes, shape, mesh, "param", rules)
        except ValueError as err:
            raise ValueError(f"param {_path_name(path)}: {err}") from None
        return leaf.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(sharding_of, state, is_leaf=_is_variable)


def shard_params(state: Any, mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Any:
    """`state` (a tree of nnx Variables holding arrays) placed on `mesh` by the rules; moves stay on device."""
    return jax.device_put(state, param_shardings(state, mesh, rules))


def replicate_unplaced(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every leaf that is not yet on `mesh` (an optimizer's step counter made on the default
    device) replicated over it, so that a checkpoint restores it onto the mesh too; placed leaves are kept."""

    def place(leaf: Any) -> Any:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        return jax.device_put(np.asarray(leaf), NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, tree)


def place_unplaced_params(state: Any, mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Any:
    """`state` (nnx Params) with every param not yet on `mesh` placed on it by its logical axes, as the
    checkpoint loader places the others; params already on `mesh` are kept.

    For params made after loading on the default device (a critic's fresh value head): a jitted update
    returns every param on the mesh, so a param that came in off it would change the program's input
    shardings at the next step and compile it again. The values must agree between processes (same seed).
    """
    place = make_placer(mesh, rules)

    def put(path: Sequence[Any], variable: Any) -> Any:
        value = variable.get_value()
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return variable
        return variable.replace(place(_path_name(path), np.asarray(value), variable.get_metadata()["logical_axes"]))

    return jax.tree_util.tree_map_with_path(put, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> NamedSharding:
    """The sharding of a [batch, ...] array: batch split over the 'batch' rule's axes, the rest replicated."""
    split_axes = tuple(axis for axis in _rule("batch", "activation", rules) if mesh.shape[axis] > 1)
    return NamedSharding(mesh, PartitionSpec(split_axes[0] if len(split_axes) == 1 else split_axes or None))


def batch_split(mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> int:
    """How many ways a batch is split: the product of the sizes of the 'batch' rule's mesh axes."""
    return math.prod(mesh.shape[axis] for axis in _rule("batch", "activation", rules))


def shard_batch(batch: Any, mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Any:
    """A pytree of this process's [local_batch, ...] numpy arrays as global arrays split over the batch axes.

    With several processes the global batch is the concatenation of every process's local batch
    (each host reads its own shard of the prompts).
    """
    sharding = batch_sharding(mesh, rules)
    split = batch_split(mesh, rules)

    def place(path: Sequence[Any], local: Any) -> jax.Array:
        local = np.asarray(local)
        global_batch = local.shape[0] * jax.process_count() if local.ndim else 0
        if local.ndim == 0 or global_batch % split:
            raise UserError(
                f"batch array {_path_name(path) or '<root>'} of shape {local.shape}: the global batch size "
                f"{global_batch} must be a multiple of {split} (the data x fsdp mesh size)"
            )
        return jax.make_array_from_process_local_data(sharding, local)

    return jax.tree_util.tree_map_with_path(place, batch)


def activation_constraint(mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Callable[[Any, Sequence], Any]:
    """fn(x, axes) -> x constrained to the rules' activation sharding (for models.sharding)."""

    def constrain(x: Any, axes: Sequence[str | None]) -> Any:
        spec = logical_to_spec(axes, x.shape, mesh, "activation", rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


def per_device_map(mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Callable[..., Callable]:
    """wrap(fn, in_axes, out_axes) -> fn as a shard_map over `mesh`, each argument split by the rules'
    activation specs of its logical axes (for models.sharding.per_device: attention kernels, which XLA cannot
    partition itself). The output's spec comes from its global shape (fn evaluated abstractly)."""

    def wrap(fn: Callable, in_axes: Sequence[Sequence], out_axes: Sequence) -> Callable:
        def run(*args):
            in_specs = tuple(logical_to_spec(axes, arg.shape, mesh, "activation", rules)
                             for axes, arg in zip(in_axes, args))
            out_shape = jax.eval_shape(fn, *args).shape
            out_spec = logical_to_spec(out_axes, out_shape, mesh, "activation", rules)
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)

        return run

    return wrap


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, AxisRule] = RULES) -> Iterator[None]:
    """Within this block the models constrain their activations to `mesh` by the rules (and run their
    attention kernels per device, by the same rules)."""
    from models import sharding as model_sharding  # models/ depends on nothing here; import at use

    with model_sharding.use_activation_sharding(activation_constraint(mesh, rules), per_device_map(mesh, rules)):
        yield


def make_placer(
    mesh: Mesh, rules: Mapping[str, AxisRule] = RULES, dtype: Any = None
) -> Callable[[str, Any, Sequence[str | None]], jax.Array]:
    """place(name, array, logical_axes) -> jax.Array on `mesh`, built shard by shard from `array`.

    `array` is anything indexable by a tuple of slices with a `.shape` (or `.get_shape()`): a numpy array,
    an np.memmap, a safetensors slice. Each device's shard is read on its own, so no device (and, with
    a lazy `array`, no host) ever holds the whole tensor. `dtype`, when given, converts each shard.
    """

    def place(name: str, array: Any, logical_axes: Sequence[str | None]) -> jax.Array:
        shape = tuple(array.shape if hasattr(array, "shape") else array.get_shape())
        if len(shape) != len(logical_axes):
            raise UserError(f"tensor {name}: shape {shape} does not have the {len(logical_axes)} dims "
                            f"of its logical axes {tuple(logical_axes)}")
        sharding = NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, "param", rules))

        def read_shard(index: tuple[slice, ...]) -> np.ndarray:
            shard = np.asarray(array[index])
            return shard if dtype is None else shard.astype(dtype)

        return jax.make_array_from_callback(shape, sharding, read_shard)

    return place


def is_main_process() -> bool:
    """True on the one process that writes logs and exports (process 0)."""
    return jax.process_index() == 0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer") from None


def _multihost_env(environ: Mapping[str, str]) -> str | None:
    """Which environment says this run spans several hosts, or None for a single host."""
    if _env_int(environ, "JAX_NUM_PROCESSES", 1) > 1 and "JAX_COORDINATOR_ADDRESS" in environ:
        return "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID"
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(var in environ for var in slurm_vars) and _env_int(environ, "SLURM_NTASKS", 1) > 1:
        return "SLURM"
    if environ.get("RLMT_MULTIHOST") == "1":  # set by tpu_scripts/launch.sh on every worker
        return "RLMT_MULTIHOST"
    if len(environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:  # GKE TPU pods
        return "TPU_WORKER_HOSTNAMES"
    if _env_int(environ, "MEGASCALE_NUM_SLICES", 1) > 1:  # multi-slice TPU
        return "MEGASCALE_NUM_SLICES"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Starts multi-host JAX when this run spans several hosts; returns whether it is multi-host.

    Must run before anything touches a JAX device. Explicit settings win (coordinator 'host:port',
    the number of processes and this process's id); else the environment decides: JAX_* variables,
    SLURM with several tasks, RLMT_MULTIHOST=1 (what tpu_scripts/launch.sh sets on TPU VMs), GKE's
    TPU_WORKER_HOSTNAMES, or a multi-slice TPU. With none of these it does nothing (one host).
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None:
        if num_processes < 1:
            raise UserError(f"distributed.num_processes={num_processes} must be at least 1")
        if num_processes == 1:
            return False
        if coordinator_address is None or process_id is None:
            raise UserError(
                f"distributed.num_processes={num_processes} needs distributed.coordinator_address "
                "(host:port of process 0) and distributed.process_id"
            )
        if not 0 <= process_id < num_processes:
            raise UserError(f"distributed.process_id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    source = _multihost_env(os.environ if environ is None else environ)
    if source is None:
        return False
    if source.startswith("JAX_"):
        env = os.environ if environ is None else environ
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"], _env_int(env, "JAX_NUM_PROCESSES", 1), _env_int(env, "JAX_PROCESS_ID", 0)
        )
    else:
        jax.distributed.initialize()  # JAX finds the coordinator from SLURM / the TPU metadata itself
    return True
