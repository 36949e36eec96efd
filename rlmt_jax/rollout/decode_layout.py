"""DecodeLayout: the mesh, rules and dtype a sampler runs in, and the one program that copies a policy into it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlmt_jax.scale import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Where a sampler runs and in what dtype: a rollout mesh (mesh.rollout_mesh), the rules that place the
    policy's copy and the activations on it (mesh.ROLLOUT_RULES), and the copy's dtype (the compute dtype).

        layout = DecodeLayout.of(training_mesh, cfg.rollout.mesh, cfg.runtime.dtype)
    """

    mesh: Mesh
    dtype: str
    rules: Mapping = dataclasses.field(default_factory=lambda: mesh_lib.ROLLOUT_RULES)

    @classmethod
    def of(cls, mesh: Mesh, config, dtype: str) -> DecodeLayout:
        """The layout of `config` (a config.RolloutMeshConfig) over the devices of the training `mesh`."""
        return cls(mesh_lib.rollout_mesh(mesh, config), dtype)

    def copier(self, params: nnx.State):
        """A fn(params) -> the params cast to `dtype` and placed by the rules on the rollout mesh, for params of
        the tree of `params`: one jitted program that moves every weight once (their float32 shards in, whole
        bfloat16 copies or tensor slices out; the params may sit on any mesh over the same devices in the same
        order); the identity when `params` already lie in the layout (one device, in `dtype`): nothing to copy."""
        shardings = mesh_lib.param_shardings(params, self.mesh, self.rules)
        dtype = jnp.dtype(self.dtype)
        if _devices_of(params).isdisjoint(self.mesh.devices.flat):  # split placement: the training devices
            return self._host_local_copier(params, shardings)
        if all(x.dtype == dtype and x.sharding.is_equivalent_to(target, x.ndim)
               for x, target in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True)):
            return lambda p: p
        whole = NamedSharding(self.mesh, PartitionSpec())

        def cast_and_gather(x):
            # cast the shard first (half the bytes to move in bfloat16), then gather it whole; the tensor split,
            # if any, is then a local slice. Straight from FSDP to a tensor split of another device grouping, XLA
            # would replicate the float32 tensor instead ("involuntary full rematerialization").
            return jax.lax.with_sharding_constraint(x.astype(dtype), whole)

        return jax.jit(lambda p: jax.tree.map(cast_and_gather, p), out_shardings=shardings)

    def _host_local_copier(self, params: nnx.State, shardings):
        """Split placement (rollout.devices): the params train on other devices of the same hosts. The copy is
        one jitted program on the training devices (cast, then gathered whole on each: the collective stays
        among them), then each process copies its whole tensors to its own decode devices (their tensor slices
        with tensor > 1): nothing crosses hosts. Params already on the layout's devices pass as they are (the
        engine's thread gets them pushed)."""
        dtype = jnp.dtype(self.dtype)
        source = jax.tree.leaves(params)[0].sharding.mesh
        decode_devices = set(self.mesh.devices.flat)
        if {d.process_index for d in _devices_of(params)} != {d.process_index for d in decode_devices}:
            raise ValueError("split placement: the training and the decode devices must be on the same hosts")
        gather = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                         out_shardings=NamedSharding(source, PartitionSpec()))

        def copy(p):
            if _devices_of(p) == decode_devices:
                return p
            return jax.tree.map(_to_local_devices, gather(p), shardings)

        return copy

    def activation_sharding(self):
        """The layout's activation rules (models.sharding.constrain), as a context."""
        return mesh_lib.activation_sharding(self.mesh, self.rules)


def _devices_of(params) -> set:
    """The devices the leaves of `params` lie on, together."""
    return set().union(*(leaf.sharding.device_set for leaf in jax.tree.leaves(params)))


def _to_local_devices(whole: jax.Array, sharding: NamedSharding) -> jax.Array:
    """`whole` (every device of its process holds all of it) placed by `sharding` on devices of the same
    process: each of them takes its piece from this process's copy."""
    local = whole.addressable_shards[0].data
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(whole.shape).items():
        everything = all(i == slice(None) or (i.start in (None, 0) and i.stop in (None, n))
                         for i, n in zip(index, whole.shape))
        pieces.append(jax.device_put(local if everything else local[index], device))
    return jax.make_array_from_single_device_arrays(whole.shape, sharding, pieces)
