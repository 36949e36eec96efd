"""The items of a checkpoint step and how each is stored with orbax.

- array items (`ARRAY_ITEMS`): pytrees of arrays (policy params, optax state, critic params and state),
  written with orbax's standard handler. An `nnx.State` is stored as its pure nested dict, so a
  checkpoint does not depend on NNX classes.
- JSON items (`JSON_ITEMS`): the rng key(s) as uint32 words and a metadata dict (the step, package
  versions, the checksum of every array, whatever the trainer adds, e.g. a config hash), written once by
  the primary process; and the data iterator state (a JSON dict), written by every process into its own
  file `data_iter/process_<i>-of-<n>.json`, because each host reads its own shard of the prompts.

`save_args` turns a step's items into orbax's save arguments, refusing arrays with a non-finite element
(NonFiniteError); `restore_args` and `restored_items` turn them back, checking every array against the
checksum saved in the metadata (`rlmt_jax.run.checksums`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from rlmt_jax.run.checksums import device_checksums, host_checksum

ARRAY_ITEMS = ("params", "opt_state", "critic_params", "critic_opt_state")
JSON_ITEMS = ("data_iter", "rng", "meta")
_VERSIONED_PACKAGES = ("rlmt-jax", "jax", "flax", "optax", "orbax-checkpoint")


class NonFiniteError(RuntimeError):
    """Arrays to be saved hold NaN or inf: they are not saved."""


# ---------------------------------------------------------------------------------------------- rng keys


def rng_to_json(keys: Any) -> Any:
    """A key, or a pytree of keys, as JSON: each key -> {"impl", "shape", "data": uint32 words}.

    Typed keys (`jax.random.key`) keep their implementation name; raw `PRNGKey` uint32 arrays get
    impl None and come back as uint32 arrays.
    """

    def one(key: Any) -> dict[str, Any]:
        key = jax.numpy.asarray(key)
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            impl, words = str(jax.random.key_impl(key)), np.asarray(jax.random.key_data(key))
        else:
            impl, words = None, np.asarray(key)
        if words.dtype != np.uint32:
            raise ValueError(f"an rng key must be a typed key or uint32 words, got dtype {words.dtype}")
        return {"impl": impl, "shape": list(words.shape), "data": [int(w) for w in words.ravel()]}

    return jax.tree.map(one, keys)


def rng_from_json(tree: Any) -> Any:
    """Inverse of `rng_to_json`: the same pytree of keys."""

    def is_key_record(x: Any) -> bool:
        return isinstance(x, dict) and set(x) == {"impl", "shape", "data"}

    def one(record: dict[str, Any]) -> jax.Array:
        words = np.asarray(record["data"], dtype=np.uint32).reshape(record["shape"])
        if record["impl"] is None:
            return jax.numpy.asarray(words)
        return jax.random.wrap_key_data(words, impl=record["impl"])

    return jax.tree.map(one, tree, is_leaf=is_key_record)


# ------------------------------------------------------------------------------ per-process JSON item


def process_file_name() -> str:
    """This process's file in a per-process JSON item (`data_iter`)."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _PerProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes (and reads back) its own JSON file in the item's directory."""

    def save(self, directory: epath.Path, args: PerProcessJsonSave) -> None:
        (directory / process_file_name()).write_text(json.dumps(args.value))

    def restore(self, directory: epath.Path, args: PerProcessJsonRestore | None = None) -> Any:
        return json.loads((directory / process_file_name()).read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    value: Any


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The orbax handler of each item."""
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers |= {"rng": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    handlers["data_iter"] = _PerProcessJsonHandler()
    return handlers


# ------------------------------------------------------------------------------------------- pytrees


def pure(tree: Any) -> Any:
    """An nnx.State as its pure nested dict; any other pytree as it is."""
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _path_name(path: tuple) -> str:
    """A key path as 'layers.0.kernel' (dict keys, attribute names and indices alike)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _named_leaves(tree: Any) -> dict[str, Any]:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape by its path name ('layers.0.kernel')."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _verify_checksums(step: int, saved: Mapping[str, Any] | None, restored: Mapping[str, Any]) -> None:
    """ValueError naming the first array whose checksum differs from the saved one (older checkpoints
    without checksums are not checked)."""
    if not saved:
        return
    arrays = {f"{name}/{path}": leaf for name, tree in restored.items()
              for path, leaf in _named_leaves(pure(tree)).items() if f"{name}/{path}" in saved}
    on_host = {n: a for n, a in arrays.items() if isinstance(a, np.ndarray)}
    sums = {n: host_checksum(a) for n, a in on_host.items()}
    sums |= device_checksums({n: a for n, a in arrays.items() if n not in on_host})[0]
    for name, value in sums.items():
        if list(value) != list(saved[name]):
            raise ValueError(f"array {name} of step {step} does not match its saved checksum "
                             "(a changed or damaged file)")


def _restore_target(leaf: Any) -> Any:
    """The abstract array orbax restores one leaf onto: the leaf's own sharding, else this process's first
    device (the trainer puts every leaf on its mesh first: a multi-host run needs global arrays)."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, np.ndarray):
        return leaf
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _host_target(metadata_leaf: Any) -> np.ndarray:
    """A numpy placeholder: orbax restores this leaf into host memory (np.empty allocates lazily)."""
    return np.empty(metadata_leaf.shape, metadata_leaf.dtype)


# ------------------------------------------------------------------------------------ saving and restoring


def _json_ready(name: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint item {name!r} is not JSON-serialisable: {e}") from e
    return value


def _package_versions() -> dict[str, str]:
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def save_args(step: int, items: Mapping[str, Any]) -> tuple[ocp.args.Composite, int]:
    """Orbax's arguments to save `items` as step `step` (None values skipped), and the bytes of their arrays.

    The 'meta' item gets the step, the package versions and the checksum of every array added.
    """
    args: dict[str, Any] = {}
    for name, value in items.items():
        if value is None:
            continue
        if name in ARRAY_ITEMS:
            args[name] = ocp.args.StandardSave(pure(value))
        elif name == "rng":
            args[name] = ocp.args.JsonSave(rng_to_json(value))
        elif name == "data_iter":
            args[name] = PerProcessJsonSave(_json_ready(name, value))
        elif name in JSON_ITEMS:
            args[name] = ocp.args.JsonSave(_json_ready(name, value))
        else:
            raise ValueError(f"unknown checkpoint item {name!r}; known: {ARRAY_ITEMS + JSON_ITEMS}")
    arrays = {f"{name}/{path}": leaf for name in ARRAY_ITEMS if items.get(name) is not None
              for path, leaf in _named_leaves(pure(items[name])).items()}
    checksums, non_finite = device_checksums(arrays)
    if non_finite:
        raise NonFiniteError(f"step {step}: not saved, {', '.join(non_finite[:3])} "
                             f"{'has' if len(non_finite) == 1 else 'have'} NaN or inf values")
    meta = {**(items.get("meta") or {}), "step": step, "versions": _package_versions(), "checksums": checksums}
    args["meta"] = ocp.args.JsonSave(_json_ready("meta", meta))
    return ocp.args.Composite(**args), sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())


def restore_args(abstract_items: Mapping[str, Any], saved_tree: Callable[[str], Any]) -> ocp.args.Composite:
    """Orbax's arguments to restore the named items (and 'meta') onto their targets (see
    `CheckpointStore.restore`); `saved_tree(name)` gives an array item's tree as saved, for targets of None."""
    args = {"meta": ocp.args.JsonRestore()}
    for name, target in abstract_items.items():
        if name == "data_iter":
            args[name] = PerProcessJsonRestore()
        elif name not in ARRAY_ITEMS:
            args[name] = ocp.args.JsonRestore()
        elif target is None:
            args[name] = ocp.args.StandardRestore(jax.tree.map(_host_target, saved_tree(name)))
        else:
            args[name] = ocp.args.StandardRestore(jax.tree.map(_restore_target, pure(target)))
    return ocp.args.Composite(**args)


def restored_items(step: int, abstract_items: Mapping[str, Any], restored: Mapping[str, Any]) -> dict[str, Any]:
    """The items orbax restored, each of its target's kind, once every array matches its saved checksum."""
    _verify_checksums(step, (restored["meta"] or {}).get("checksums"),
                      {name: restored[name] for name in abstract_items if name in ARRAY_ITEMS})
    items = {}
    for name, target in abstract_items.items():
        value = restored[name]
        if name == "rng":
            value = rng_from_json(value)
        elif name in ARRAY_ITEMS and target is None:
            value = nnx.restore_int_paths(value) if isinstance(value, dict) else value
        elif isinstance(target, nnx.State):
            state = jax.tree.map(lambda x: x, target)  # a fresh State; the caller's target is untouched
            nnx.replace_by_pure_dict(state, value)
            value = state
        items[name] = value
    return items
