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

    def activation_sharding(self):
        """The layout's activation rules (models.sharding.constrain), as a context."""
        return mesh_lib.activation_sharding(self.mesh, self.rules)
