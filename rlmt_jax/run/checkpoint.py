"""Training checkpoints with orbax: save every N steps, keep the last k and the best, resume, read params.

A checkpoint is one step directory under `RUN_DIR/checkpoints/` holding named items:

- array items (`ARRAY_ITEMS`): pytrees of arrays (policy params, optax state, critic params and state),
  written with orbax's standard handler. An `nnx.State` is stored as its pure nested dict, so a
  checkpoint does not depend on NNX classes.
- JSON items (`JSON_ITEMS`): the rng key(s) as uint32 words and a metadata dict (the step, package
  versions, whatever the trainer adds, e.g. a config hash), written once by the primary process; and
  the data iterator state (a JSON dict), written by every process into its own file
  `data_iter/process_<i>-of-<n>.json`, because each host reads its own shard of the prompts.

Orbax writes a step into `<step>.orbax-checkpoint-tmp*`, writes `commit_success.txt` into it and then
renames it to `<step>`, so a step directory without the marker, or a tmp directory, is never taken as a
checkpoint. A writing store removes such a step dir when it opens, so that step is saved again. A committed
step that still fails to restore (a truncated array file, or an array whose checksum differs from the one
saved in its metadata, `rlmt_jax.run.checksums`) is skipped with a warning naming the step, the one before it is
used, and the skipped one is renamed `<step>.unusable`.

Saving refuses arrays with a non-finite element (NonFiniteError), and a write that cannot happen (a
read-only or full disk) ends in one CheckpointWriteError line within seconds; the earlier steps stay intact.
Step dirs that are symbolic links are refused when the store opens (pruning would fail on them).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from rlmt_jax.scale import multihost
from rlmt_jax.run.checksums import device_checksums, host_checksum
from rlmt_jax.core.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state", "critic_params", "critic_opt_state")
JSON_ITEMS = ("data_iter", "rng", "meta")
COMMIT_MARKER = "commit_success.txt"  # written by orbax 0.12 into a step dir just before it is committed
TMP_MARKER = ".orbax-checkpoint-tmp"
UNUSABLE_SUFFIX = ".unusable"
ROLLED_BACK_SUFFIX = ".rolled-back"
SPACE_MARGIN = 1.05  # a save needs its arrays' bytes (uncompressed) free, and a little more
_VERSIONED_PACKAGES = ("rlmt-jax", "jax", "flax", "optax", "orbax-checkpoint")


def checkpoint_dir(run_dir: str | os.PathLike) -> epath.Path:
    """Where a run keeps its checkpoints: RUN_DIR/checkpoints (a local path or a gs:// one)."""
    return _epath(run_dir) / CHECKPOINT_SUBDIR


def _epath(path: str | os.PathLike) -> epath.Path:
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (read-only or full disk, ...); the earlier ones are intact."""


class NonFiniteError(RuntimeError):
    """Arrays to be saved hold NaN or inf: they are not saved."""


class _OrbaxErrorFilter(logging.Filter):
    """Drops orbax's own error records (a traceback per background thread): the store reports one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_ERROR_FILTER = _OrbaxErrorFilter()


def _first_line(err: BaseException) -> str:
    """The error's first line, its middle left out when long (the cause, e.g. the OS error, is at its end)."""
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    return text[0] if len(text[0]) <= 400 else f"{text[0][:150]} ... {text[0][-250:]}"


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step and the requested items (same kinds as the targets given)."""

    step: int
    items: dict[str, Any]


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


def _process_file_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _PerProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes (and reads back) its own JSON file in the item's directory."""

    def save(self, directory: epath.Path, args: PerProcessJsonSave) -> None:
        (directory / _process_file_name()).write_text(json.dumps(args.value))

    def restore(self, directory: epath.Path, args: PerProcessJsonRestore | None = None) -> Any:
        return json.loads((directory / _process_file_name()).read_text())

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


# ------------------------------------------------------------------------------------------- pytrees


def _pure(tree: Any) -> Any:
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


def _verify_checksums(step: int, saved: Mapping[str, Any] | None, restored: Mapping[str, Any]) -> None:
    """ValueError naming the first array whose checksum differs from the saved one (older checkpoints
    without checksums are not checked)."""
    if not saved:
        return
    arrays = {f"{name}/{path}": leaf for name, tree in restored.items()
              for path, leaf in _named_leaves(_pure(tree)).items() if f"{name}/{path}" in saved}
    on_host = {n: a for n, a in arrays.items() if isinstance(a, np.ndarray)}
    sums = {n: host_checksum(a) for n, a in on_host.items()}
    sums |= device_checksums({n: a for n, a in arrays.items() if n not in on_host})[0]
    for name, value in sums.items():
        if list(value) != list(saved[name]):
            raise ValueError(f"array {name} of step {step} does not match its saved checksum "
                             "(a changed or damaged file)")


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


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


def _step_of_tmp_dir(name: str) -> str:
    return name.split(TMP_MARKER, 1)[0]


# --------------------------------------------------------------------------------------------- store


def _metric_fn(name: str, mode: str) -> Callable[[Mapping[str, float]], float]:
    """Ranks checkpoints by metrics[name]; a missing or non-finite value ranks worst."""
    worst = -math.inf if mode == "max" else math.inf

    def metric(metrics: Mapping[str, float]) -> float:
        value = metrics.get(name) if metrics else None
        return float(value) if value is not None and math.isfinite(value) else worst

    return metric


class CheckpointStore:
    """The checkpoints of one run directory (`RUN_DIR/checkpoints/<step>/`).

    save_every: `save` writes when step % save_every == 0, and always when `final=True`.
    keep: the last `keep` checkpoints are kept; with `best_metric` the best one by that metric
        (`best_mode` 'max' or 'min') is kept as well, however old.
    async_save: orbax copies the arrays to host before `save` returns and writes in a background
        thread; call `wait_until_finished()` (or `close()`) before the process exits.
    read_only: for readers (export): never writes, renames or cleans anything.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 100,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise UserError(f"checkpoint save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise UserError(f"checkpoint keep must be >= 1 (the newest is needed to resume), got {keep}")
        if best_mode not in ("max", "min"):
            raise UserError(f"checkpoint best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = _epath(directory)
        self.save_every = save_every
        self.best_metric = best_metric
        self.read_only = read_only
        self._writing: int | None = None  # the step of a save in flight
        self._failed = False
        self._closed = False
        self._warn_about_unfinished_writes()
        if not read_only:
            self._refuse_symlinked_steps()
            self._remove_uncommitted_steps()
            logging.getLogger("absl").addFilter(_ORBAX_ERROR_FILTER)

        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = _metric_fn(best_metric, best_mode)
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers |= {"rng": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        handlers["data_iter"] = _PerProcessJsonHandler()
        self._manager = (
            ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
            if self.directory.is_dir() or not read_only
            else None
        )
        # orbax removes old temporary folders in a thread of its own; a run that stops right after (bad data
        # found while setting up) would end the interpreter under it, and the thread print a 40-line trace
        wait_for_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, **settings: Any) -> CheckpointStore:
        """The store of RUN_DIR/checkpoints (settings as in the constructor)."""
        return cls(checkpoint_dir(run_dir), **settings)

    # ------------------------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (a step dir without orbax's commit marker is not one)."""
        if self._manager is None:
            return []
        return [s for s in self._manager.all_steps() if self._is_committed(s)]

    def latest_step(self) -> int | None:
        """The newest committed step, or None. `restore` may still fall back if its files are damaged."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best committed step by `best_metric` (the latest when no metric is set)."""
        if self._manager is None:
            return None
        best = self._manager.best_step()
        return best if best is not None and self._is_committed(best) else self.latest_step()

    def should_save(self, step: int, *, final: bool = False) -> bool:
        """True on every `save_every`-th step and on the final step, unless that step is saved or saving."""
        if self.read_only or self._failed or step in self._manager.all_steps():  # includes a write in flight
            return False
        return final or step % self.save_every == 0

    # ------------------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        items: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        final: bool = False,
    ) -> bool:
        """Writes `items` as checkpoint `step` when `should_save(step, final=final)`; True if it did.

        items: names from ARRAY_ITEMS (pytrees of arrays or nnx.State) and JSON_ITEMS ('data_iter': a
            JSON dict, 'rng': a key or pytree of keys, 'meta': a JSON dict); None values are skipped.
        metrics: scalars of this step; `best_metric` must be among them when it is set.
        """
        if not self.should_save(step, final=final):
            return False
        args: dict[str, Any] = {}
        for name, value in items.items():
            if value is None:
                continue
            if name in ARRAY_ITEMS:
                args[name] = ocp.args.StandardSave(_pure(value))
            elif name == "rng":
                args[name] = ocp.args.JsonSave(rng_to_json(value))
            elif name == "data_iter":
                args[name] = PerProcessJsonSave(_json_ready(name, value))
            elif name in JSON_ITEMS:
                args[name] = ocp.args.JsonSave(_json_ready(name, value))
            else:
                raise ValueError(f"unknown checkpoint item {name!r}; known: {ARRAY_ITEMS + JSON_ITEMS}")
        arrays = {f"{name}/{path}": leaf for name in ARRAY_ITEMS if items.get(name) is not None
                  for path, leaf in _named_leaves(_pure(items[name])).items()}
        checksums, non_finite = device_checksums(arrays)
        if non_finite:
            raise NonFiniteError(f"step {step}: not saved, {', '.join(non_finite[:3])} "
                                 f"{'has' if len(non_finite) == 1 else 'have'} NaN or inf values")
        meta = {**(items.get("meta") or {}), "step": step, "versions": _package_versions(), "checksums": checksums}
        args["meta"] = ocp.args.JsonSave(_json_ready("meta", meta))
        metrics_json = self._metrics_json(metrics)
        self.wait_until_finished()
        self._check_writable(step, sum(int(getattr(a, "nbytes", 0)) for a in arrays.values()))
        self._writing = step
        try:
            self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics_json, force=True)
        except Exception as err:  # noqa: BLE001 - any failure to write becomes one line
            self._write_failed(err)
        return True

    def _check_writable(self, step: int, nbytes: int) -> None:
        """CheckpointWriteError (on every process alike) unless each process can create a file in the
        checkpoint dir and, on a local disk, the disk has room for the arrays."""
        problem = ""
        probe = self.directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            problem = err.strerror or _first_line(err)
        if not problem and "://" not in os.fspath(self.directory):
            free = shutil.disk_usage(os.fspath(self.directory)).free
            if free < nbytes * SPACE_MARGIN:
                problem = f"{free / 2**20:.0f} MiB free, {nbytes * SPACE_MARGIN / 2**20:.0f} MiB needed"
        if multihost.global_max_int(int(bool(problem))):
            self._failed = True
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} in {self.directory}: {problem or 'failed on another process'}"
                f"; {self._intact_text()}")

    def _write_failed(self, err: BaseException) -> None:
        step, self._writing, self._failed = self._writing, None, True
        raise CheckpointWriteError(f"writing checkpoint step {step} in {self.directory} failed: {_first_line(err)}; "
                                   f"{self._intact_text()}") from None

    def _intact_text(self) -> str:
        steps = self.all_steps()
        return f"the checkpoints of steps {steps} are intact" if steps else "no earlier checkpoint exists"

    def _metrics_json(self, metrics: Mapping[str, float] | None) -> dict[str, float] | None:
        if self.best_metric is None:
            return None
        metrics = {name: float(value) for name, value in (metrics or {}).items()}
        if self.best_metric not in metrics:
            raise UserError(
                f"the checkpoint best_metric {self.best_metric!r} is not among the step's metrics "
                f"{sorted(metrics)}"
            )
        return metrics

    def wait_until_finished(self) -> None:
        """Blocks until background writes are committed (and old checkpoints pruned); CheckpointWriteError
        when one failed."""
        if self._manager is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure to write becomes one line
            if self._writing is None:
                raise
            self._write_failed(err)
        self._writing = None

    def close(self) -> None:
        """Waits for background writes, then releases orbax's threads (after a failed write: neither)."""
        if self._manager is not None and not self._failed and not self._closed:
            self.wait_until_finished()
            self._manager.close()
            self._closed = True

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ restoring

    def restore(self, abstract_items: Mapping[str, Any], step: int | None = None) -> Restored | None:
        """Restores the named items of checkpoint `step`, or of the newest usable one; None if none exist.

        abstract_items: item name -> target. For an array item the target is a pytree (or nnx.State)
            of jax.ShapeDtypeStruct / jax.Array leaves: each leaf is read straight onto that leaf's
            sharding, so a run on a mesh restores sharded, never a full replica per device (a leaf
            without a sharding goes to the first device); a target of None reads numpy arrays into
            host memory. The result has the target's kind (pure dict or nnx.State). JSON items take
            None; 'rng' comes back as keys.
        A newest checkpoint that fails to read is skipped with a warning naming its step; once an
        older one restores, the skipped ones are renamed `<step>.unusable` (unless read-only) so the
        run can write those steps again. When every checkpoint fails: UserError listing each step's
        reason, nothing renamed. Targets whose items, tensors or shapes differ from the checkpoint
        raise UserError naming them, without falling back.
        """
        unknown = set(abstract_items) - set(ARRAY_ITEMS + JSON_ITEMS)
        if unknown:
            raise ValueError(f"unknown checkpoint items {sorted(unknown)}; known: {ARRAY_ITEMS + JSON_ITEMS}")
        self.wait_until_finished()
        steps = list(reversed(self.all_steps()))
        if step is not None:
            if step not in steps:
                raise UserError(f"no committed checkpoint at step {step} in {self.directory}; steps: {steps[::-1]}")
            steps = [step]
        failures: list[str] = []
        skipped: list[int] = []
        for candidate in steps:
            try:
                self._check_targets(candidate, abstract_items)
                items = self._restore_step(candidate, abstract_items)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure of a damaged checkpoint
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                failures.append(f"step {candidate}: {reason}")
                if step is None:
                    log.warning(
                        "checkpoint step %d in %s cannot be restored (%s); skipping it and falling back to the "
                        "one before it",
                        candidate,
                        self.directory,
                        reason,
                    )
                skipped.append(candidate)
                continue
            # set aside only once an older step has restored, so a failure common to all steps renames nothing
            for damaged in skipped:
                self._set_aside(damaged)
            return Restored(step=candidate, items=items)
        if failures:
            raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures))
        return None

    def _check_targets(self, step: int, abstract_items: Mapping[str, Any]) -> None:
        """Every tensor of each array target is in the checkpoint with the same shape, and no more."""
        step_dir = self.directory / str(step)
        missing = [name for name in abstract_items if not (step_dir / name).is_dir()]
        if missing:  # orbax commits all items at once, so this checkpoint was saved without them
            present = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
            raise UserError(
                f"checkpoint {step_dir} has no {missing} (it holds {present}); was it saved by a run with "
                "another algorithm or without a critic?"
            )
        if "data_iter" in abstract_items and not (step_dir / "data_iter" / _process_file_name()).is_file():
            saved = sorted(p.name for p in (step_dir / "data_iter").iterdir())
            raise UserError(
                f"checkpoint {step_dir} has data iterator states {saved}, none for this process "
                f"({_process_file_name()}): resume with the same number of processes"
            )
        for name, target in abstract_items.items():
            if name not in ARRAY_ITEMS or target is None:
                continue
            saved = _leaf_shapes(self._array_metadata(step, name))
            wanted = _leaf_shapes(_pure(target))
            if saved.keys() != wanted.keys():
                absent = sorted(wanted.keys() - saved.keys())
                extra = sorted(saved.keys() - wanted.keys())
                raise UserError(
                    f"checkpoint {step_dir} item {name!r} does not match the model: tensors not in the "
                    f"checkpoint {absent[:5]}, tensors only in the checkpoint {extra[:5]}"
                )
            for tensor, shape in wanted.items():
                if saved[tensor] != shape:
                    raise UserError(
                        f"checkpoint {step_dir} tensor {name}.{tensor} has shape {saved[tensor]}, "
                        f"the model expects {shape}"
                    )

    def _array_metadata(self, step: int, name: str) -> Any:
        metadata = self._manager.item_metadata(step)[name]
        if metadata is None:
            raise FileNotFoundError(f"no readable metadata for item {name!r} of step {step}")
        return metadata.tree

    def meta(self, step: int) -> dict[str, Any]:
        """The metadata dict saved with checkpoint `step`."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _restore_step(self, step: int, abstract_items: Mapping[str, Any]) -> dict[str, Any]:
        args = {"meta": ocp.args.JsonRestore()}
        for name, target in abstract_items.items():
            if name == "data_iter":
                args[name] = PerProcessJsonRestore()
            elif name not in ARRAY_ITEMS:
                args[name] = ocp.args.JsonRestore()
            elif target is None:
                args[name] = ocp.args.StandardRestore(jax.tree.map(_host_target, self._array_metadata(step, name)))
            else:
                args[name] = ocp.args.StandardRestore(jax.tree.map(_restore_target, _pure(target)))
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
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

    # --------------------------------------------------------------------------------- directory care

    def _is_committed(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_MARKER).is_file()

    def _warn_about_unfinished_writes(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.iterdir()):
            if TMP_MARKER in path.name:
                log.warning(
                    "ignoring unfinished checkpoint write of step %s at %s (a writer was stopped before its "
                    "commit)%s",
                    _step_of_tmp_dir(path.name),
                    path,
                    "" if self.read_only else "; it will be removed",
                )
            elif self.read_only and path.is_dir() and path.name.isdigit() and not (path / COMMIT_MARKER).is_file():
                log.warning(
                    "ignoring checkpoint step %s at %s: it has no commit marker %s (a partial copy or write)",
                    path.name,
                    path,
                    COMMIT_MARKER,
                )

    def _refuse_symlinked_steps(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.split(".", 1)[0].isdigit() and os.path.islink(os.fspath(path)):
                raise CheckpointWriteError(
                    f"checkpoint step dir {path} is a symbolic link; the run prunes old steps itself and cannot "
                    "remove a link: replace it by a copy of its target, or move it out")

    def _remove_uncommitted_steps(self) -> None:
        """Deletes step dirs without orbax's commit marker (a write that was stopped): that step is saved again."""
        if not self.directory.is_dir():
            return
        stale = sorted(p for p in self.directory.iterdir()
                       if p.name.isdigit() and p.is_dir() and not (p / COMMIT_MARKER).is_file())
        if jax.process_index() == 0:
            for path in stale:
                shutil.rmtree(os.fspath(path)) if "://" not in os.fspath(path) else path.rmtree()
                log.warning("removed the uncommitted checkpoint step dir %s; the run saves that step again", path)
        if stale:
            ocp.multihost.sync_global_processes("rlmt_checkpoint_remove_uncommitted")

    def set_aside_after(self, step: int) -> list[int]:
        """Renames every committed step newer than `step` to `<step>.rolled-back` (a rollback to `step`: the
        run writes those steps again); returns them."""
        newer = [s for s in self.all_steps() if s > step]
        for later in newer:
            self._set_aside(later, ROLLED_BACK_SUFFIX, "rolled back past checkpoint")
        return newer

    def _set_aside(self, step: int, suffix: str = UNUSABLE_SUFFIX, why: str = "damaged checkpoint") -> None:
        """Renames a step dir so the resumed run can write that step again; data is kept."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = source.with_name(f"{step}{suffix}")
            n = 1
            while target.exists():
                target, n = source.with_name(f"{step}{suffix}-{n}"), n + 1
            source.rename(target)
            log.warning("renamed %s %s to %s", why, source, target)
        ocp.multihost.sync_global_processes(f"rlmt_checkpoint_set_aside_{step}")
        self._manager.reload()


# ------------------------------------------------------------------------------------------- export


def params_only(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The policy params of a run's newest usable checkpoint, as a pure nested dict of numpy arrays.

    path: a run dir (RUN_DIR/checkpoints is read), a checkpoints dir, or one step dir
        (RUN_DIR/checkpoints/<step>, which fixes the step). List indices come back as int keys, so
        `nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), params)` loads them into a model.
    """
    path = _epath(path)
    if not path.is_dir():
        raise UserError(f"checkpoint path {path} is not a directory")
    if path.name.isdigit() and (path / "params").is_dir():
        directory, step = path.parent, int(path.name) if step is None else step
    elif (path / CHECKPOINT_SUBDIR).is_dir():
        directory = path / CHECKPOINT_SUBDIR
    else:
        directory = path
    store = CheckpointStore(directory, read_only=True)
    restored = store.restore({"params": None}, step=step)
    if restored is None:
        raise UserError(f"no checkpoints in {directory} (expected step dirs such as {directory / '100'})")
    return restored.items["params"]
