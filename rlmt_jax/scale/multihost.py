"""Agreement between the processes of a multi-host run, and this process's rows of global batches.

Every jitted program that touches params sharded over all processes' devices must be called by every
process, in the same order, with the same shapes. The helpers here let the processes agree on what they
would otherwise choose alone (the longest prompt, how many reward batches, a metric's global value) and
move rows between a process and the global arrays split over the mesh's batch axes:

    global array rows = process 0's local rows, then process 1's, ...   (mesh.shard_batch)
    local_rows(global array) = this process's block of rows, in order   (the inverse)

On one process every helper is a cheap no-op (no collective runs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.core.errors import UserError


def all_gather(values: Any, devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """Every process's `values` (same shape and dtype everywhere), stacked: [process_count, *shape].

    One collective over one device per process (`devices`, in process order; default: each process's first
    device, `agreement_devices()`), so it waits only for the programs queued on those devices: with split
    placement (rollout.devices) the engine's devices and the training devices agree apart, each in its own
    thread. The bytes travel, not the numbers, so float64 and int64 values arrive exactly (JAX would make
    them 32-bit on the way).
    """
    values = np.ascontiguousarray(values)
    if jax.process_count() == 1:
        return values[None]
    devices = tuple(agreement_devices() if devices is None else devices)
    raw = values.reshape(1, -1).view(np.uint8)
    mesh = Mesh(np.asarray(devices, object), ("processes",))
    mine = devices[jax.process_index()]
    stacked = jax.make_array_from_single_device_arrays(
        (len(devices), raw.shape[1]), NamedSharding(mesh, PartitionSpec("processes")), [jax.device_put(raw, mine)])
    gathered = np.asarray(_replicated(mesh)(stacked).addressable_data(0))  # [processes, bytes]
    return np.ascontiguousarray(gathered).view(values.dtype).reshape(len(devices), *values.shape)


@functools.cache
def _replicated(mesh: Mesh):
    return jax.jit(_identity, out_shardings=NamedSharding(mesh, PartitionSpec()))


def agreement_devices(devices: Sequence[jax.Device] | None = None) -> tuple[jax.Device, ...]:
    """One device per process, in process order: each process's first of `devices` (default: all)."""
    first: dict[int, jax.Device] = {}
    for device in sorted(jax.devices() if devices is None else devices, key=lambda d: d.id):
        first.setdefault(device.process_index, device)
    if sorted(first) != list(range(jax.process_count())):
        raise UserError(f"the devices {sorted(d.id for d in first.values())} are not on every process")
    return tuple(first[p] for p in range(jax.process_count()))


def global_max_int(value: int) -> int:
    """The largest of every process's `value`."""
    return int(all_gather(np.asarray([value], np.int64)).max())


def global_min_int(value: int) -> int:
    """The smallest of every process's `value`."""
    return int(all_gather(np.asarray([value], np.int64)).min())


def global_metrics(metrics: Mapping[str, float], rows: int, sums: Collection[str] = ()) -> dict[str, float]:
    """Per-process metrics of `rows` rows each -> the values over all processes' rows (`combine_metrics`).

    All processes must pass the same keys. One process: `metrics` unchanged (no collective).
    """
    if jax.process_count() == 1:
        return dict(metrics)
    names = sorted(metrics)
    table = all_gather(np.asarray([rows, *(float(metrics[k]) for k in names)], np.float64))
    return combine_metrics(names, table[:, 0], table[:, 1:], sums)


def combine_metrics(names: Sequence[str], rows: np.ndarray, values: np.ndarray,
                    sums: Collection[str] = ()) -> dict[str, float]:
    """One value per metric from every process's value.  rows: [processes]; values: [processes, names].

    Names in `sums` are added (counts); `*_max` names take the max, `*_min` the min; a `*_std` name with
    its `*_mean` beside it is the pooled std  sqrt(sum_p rows_p (std_p^2 + mean_p^2) / R - mean^2);
    every other name is the row-weighted mean  sum_p rows_p * value_p / R  (R = sum_p rows_p).
    """
    rows = np.asarray(rows, np.float64)
    total = rows.sum()
    column = {name: np.asarray(values, np.float64)[:, i] for i, name in enumerate(names)}

    def mean(x: np.ndarray) -> float:
        return float((rows * x).sum() / total) if total else 0.0

    out: dict[str, float] = {}
    for name in names:
        x = column[name]
        mean_name = name[: -len("_std")] + "_mean"
        if name in sums:
            out[name] = float(x.sum())
        elif name.endswith("_max"):
            out[name] = float(x.max())
        elif name.endswith("_min"):
            out[name] = float(x.min())
        elif name.endswith("_std") and mean_name in column:
            second_moment = mean(x**2 + column[mean_name] ** 2)
            out[name] = math.sqrt(max(second_moment - mean(column[mean_name]) ** 2, 0.0))
        else:
            out[name] = mean(x)
    return out


def check_batch_split_by_process(mesh: Mesh) -> None:
    """UserError unless each process's devices hold their own 1/process_count of a batch's rows.

    That is what makes a global batch the concatenation of the processes' local rows. It fails when the
    batch axes (data, fsdp) do not span the processes, e.g. when only `mesh.dcn_tensor` crosses hosts.
    """
    processes = jax.process_count()
    if processes == 1:
        return
    split = mesh_lib.batch_split(mesh)
    blocks: dict[int, set[int]] = {}
    for device, index in mesh_lib.batch_sharding(mesh).devices_indices_map((split,)).items():
        blocks.setdefault(device.process_index, set()).add(index[0].start or 0)
    owned = [blocks.get(p, set()) for p in range(processes)]
    disjoint = sum(map(len, owned)) == len(set().union(*owned))
    if split % processes or not disjoint or any(len(block) != split // processes for block in owned):
        raise UserError(
            f"mesh {dict(mesh.shape)}: the batch axes (data x fsdp = {split}) must split every batch between the "
            f"{processes} processes, each its own rows; set mesh.dcn_data or mesh.dcn_fsdp (not mesh.dcn_tensor) "
            "to the number of hosts or slices"
        )


def _identity(x):
    return x


def local_rows(tree: Any, mesh: Mesh) -> Any:
    """This process's rows of every [batch, ...] array in `tree` (global arrays from a program), as numpy.

    Arrays split some other way are first re-laid out over the batch axes (a collective: every process
    must call this with the same arrays). Numpy leaves and one-process arrays are returned whole.
    """
    sharding = mesh_lib.batch_sharding(mesh)

    def take(leaf: Any) -> np.ndarray:
        if not isinstance(leaf, jax.Array) or jax.process_count() == 1:
            return np.asarray(leaf)
        if leaf.ndim == 0:
            raise ValueError("local_rows needs [batch, ...] arrays, got a scalar")
        if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            leaf = jax.jit(_identity, out_shardings=sharding)(leaf)
        shards = {shard.index[0].start or 0: shard.data for shard in leaf.addressable_shards}  # replicas once
        return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])

    return jax.tree.map(take, tree)


class HostRows:
    """A process's rows of the batches split over `mesh`'s batch axes, and how the processes agree.

    put: {name: [local_rows, ...] numpy} -> global arrays (rows of process 0 first);
    take: global arrays -> this process's rows; gather: every process's values, stacked.
    rows_multiple: a global batch must have a multiple of batch_split rows, so every process's local
    rows are a multiple of this.
    """

    def __init__(self, mesh: Mesh):
        check_batch_split_by_process(mesh)
        self.mesh = mesh
        self.process_count = jax.process_count()
        self.rows_multiple = max(mesh_lib.batch_split(mesh) // self.process_count, 1)
        self.agreement = agreement_devices(mesh.devices.reshape(-1)) if self.process_count > 1 else ()

    def put(self, tree: Any) -> Any:
        return mesh_lib.shard_batch(tree, self.mesh)

    def take(self, tree: Any) -> Any:
        return local_rows(tree, self.mesh)

    def gather(self, values: Any) -> np.ndarray:
        """all_gather over this mesh's devices only (one per process)."""
        return all_gather(values, self.agreement)


def gather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data` (any lengths), in process order: two collectives, every process must call it.
    One process: [data] (no collective)."""
    if jax.process_count() == 1:
        return [data]
    lengths = all_gather(np.asarray([len(data)], np.int64))[:, 0]
    padded = np.zeros(max(int(lengths.max()), 1), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    table = all_gather(padded)
    return [table[process, :length].tobytes() for process, length in enumerate(lengths.tolist())]


def process_zero_int(value: int) -> int:
    """Process 0's `value`, on every process (a collective: every process must call it)."""
    return int(all_gather(np.asarray([value], np.int64))[0, 0])
