"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

No torch, no pickle, no remote code: tensors are read one at a time from safetensors as numpy arrays
(bfloat16 through ml_dtypes), converted to our layout, and handed to a `place` callback that puts them on
device (by default the default device; rlmt_jax/scale/mesh.py passes one that shards them as they are read).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.sharding import logical_axes
from models.transformer import build_model, value_model_from

log = logging.getLogger(__name__)
PlaceFn = Callable[[str, np.ndarray, tuple], jax.Array]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Our parameter path (inside a decoder layer, or at the top) -> (HF name, layout).
# Layouts: "same" (identical), "flat" (HF stores it flattened to 1-D), "t1"/"t2" (HF stores the transpose of
# ours with the first 1 or 2 of our dims merged: q [embed, heads, head_dim] <-> [heads*head_dim, embed]).
LAYER_PARAMS = {
    ("attn", "q_proj"): ("self_attn.q_proj.weight", "t1"),
    ("attn", "k_proj"): ("self_attn.k_proj.weight", "t1"),
    ("attn", "v_proj"): ("self_attn.v_proj.weight", "t1"),
    ("attn", "o_proj"): ("self_attn.o_proj.weight", "t2"),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "flat"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "flat"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "flat"),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", "same"),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", "t1"),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", "t1"),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", "t1"),
    ("input_norm", "scale"): ("input_layernorm.weight", "same"),
    ("post_attention_norm", "scale"): ("post_attention_layernorm.weight", "same"),
}
TOP_PARAMS = {
    ("model", "embed"): ("model.embed_tokens.weight", "same"),
    ("model", "final_norm", "scale"): ("model.norm.weight", "same"),
    ("lm_head",): ("lm_head.weight", "t1"),
    ("score",): ("score.weight", "t1"),
}


class CheckpointError(ValueError):
    """A checkpoint does not match its config: names the tensor (and both shapes where they differ)."""


# ---------------------------------------------------------------- layout conversion
def hf_shape(our_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "same":
        return tuple(our_shape)
    if layout == "flat":
        return (math.prod(our_shape),)
    split = int(layout[1])
    return (math.prod(our_shape[split:]), math.prod(our_shape[:split]))


def to_ours(hf_array: np.ndarray, our_shape: tuple[int, ...], layout: str) -> np.ndarray:
    if layout in ("same", "flat"):
        return hf_array.reshape(our_shape)
    return np.ascontiguousarray(hf_array.T).reshape(our_shape)


def to_hf(our_array: np.ndarray, layout: str) -> np.ndarray:
    shape = hf_shape(our_array.shape, layout)
    if layout in ("same", "flat"):
        return our_array.reshape(shape)
    return np.ascontiguousarray(our_array.reshape(shape[::-1]).T)


def hf_names(path: tuple, cfg: ModelConfig) -> tuple[str, list[str], str, bool]:
    """For one of our parameter paths: (display name, HF tensor names, layout, stacked).

    An unscanned param maps to one HF name; a scanned layer param (stacked=True, a leading 'layers' axis)
    maps to one HF name per layer.
    """
    path = tuple(str(p) for p in path)
    if path in TOP_PARAMS:
        name, layout = TOP_PARAMS[path]
        return name, [name], layout, False
    if path[:2] == ("model", "layers"):
        if path[2].isdigit():
            suffix, layout = LAYER_PARAMS[path[3:]]
            name = f"model.layers.{path[2]}.{suffix}"
            return name, [name], layout, False
        suffix, layout = LAYER_PARAMS[path[2:]]
        names = [f"model.layers.{i}.{suffix}" for i in range(cfg.num_hidden_layers)]
        return f"model.layers.*.{suffix}", names, layout, True
    raise KeyError(f"no Hugging Face name for parameter {'.'.join(path)}")


# ---------------------------------------------------------------- reading
class SafetensorsReader:
    """Tensor-by-tensor access to a HF directory's safetensors files (single or sharded with an index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._open: dict[str, object] = {}
        index_path = os.path.join(self.path, INDEX_FILE)
        single_path = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
            self.file_of = {name: os.path.join(self.path, file) for name, file in weight_map.items()}
        elif os.path.isfile(single_path):
            self.file_of = {name: single_path for name in self._open_file(single_path).keys()}
        else:
            bins = [n for n in os.listdir(self.path) if n.endswith(".bin") or n.endswith(".pt")]
            hint = " (pickle .bin weights are never loaded: convert them to safetensors)" if bins else ""
            raise FileNotFoundError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        for file in set(self.file_of.values()):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")

    def names(self) -> set[str]:
        return set(self.file_of)

    def _open_file(self, file: str):
        """An open handle; a truncated or garbage file is a CheckpointError naming it."""
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="numpy").__enter__()
            except SafetensorError as err:
                raise CheckpointError(f"{file}: not a readable safetensors file (truncated or damaged: {err})"
                                      ) from None
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open_file(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        try:
            return self._open_file(file).get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: tensor {name} cannot be read (truncated or damaged: {err})") from None

    def close(self):
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


def default_place(name: str, array: np.ndarray, axes: tuple) -> jax.Array:
    return jnp.asarray(array)


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for "bfloat16", jnp.bfloat16, np.float32 and the like (ModelConfig holds names)."""
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype: {dtype!r} is not a dtype") from None


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    *,
    task: str | None = None,
    remat: str = "none",
    scan_layers: bool | str = False,
    attention: str = "auto",
    place: PlaceFn | None = None,
    seed: int = 0,
):
    """A Flax module from a HF directory, chosen by `architectures` in config.json.

    task=None: CausalLM for *ForCausalLM, RewardModel for *ForSequenceClassification; task='value': a
    ValueModel whose decoder is the checkpoint's and whose value head is fresh (seeded by `seed`).
    `place(name, array, logical_axes)` puts each tensor on device as it is read (default: default device).
    dtype (compute) and param_dtype: names ("bfloat16") or dtypes (jnp.bfloat16, np.float32).
    """
    path = os.fspath(path)
    dtype, param_dtype = dtype_name(dtype), dtype_name(param_dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a model directory")
    cfg = ModelConfig.from_pretrained(
        path, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers, attention=attention
    )
    place = place or default_place
    target = np.dtype(jnp.dtype(param_dtype))
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    reader = SafetensorsReader(path)
    used: set[str] = set()
    try:
        for param_path, variable in nnx.to_flat_state(state):
            display, names, layout, stacked = hf_names(param_path, cfg)
            our_shape = tuple(variable.shape)
            one_shape = our_shape[1:] if stacked else our_shape
            expected = hf_shape(one_shape, layout)
            parts = []
            for name in names:
                if name not in reader.file_of:
                    raise CheckpointError(f"{name}: missing from the checkpoint in {path} (expected shape {expected})")
                found = reader.shape(name)
                if found != expected:
                    raise CheckpointError(
                        f"{name}: shape {found} in the checkpoint, but the config expects {expected}"
                    )
                parts.append(to_ours(reader.get(name).astype(target), one_shape, layout))
                used.add(name)
            array = np.stack(parts) if stacked else parts[0]
            del parts
            variable.set_value(place(display, array, logical_axes(variable)))
            del array
        unexpected = reader.names() - used
        if cfg.tie_word_embeddings:
            unexpected.discard("lm_head.weight")
        unexpected = sorted(n for n in unexpected if not n.endswith(IGNORED_SUFFIXES))
        if unexpected:
            listed = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            raise CheckpointError(f"unexpected tensors in {path} for {cfg.architecture}: {listed}")
    finally:
        reader.close()
    model = nnx.merge(graphdef, state)
    if task == "value":
        return value_model_from(model, nnx.Rngs(seed))
    if task is not None:
        raise ValueError(f"task: {task!r} is not None or 'value'")
    return model


# ---------------------------------------------------------------- writing
def _host_array(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_tensors(model) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every parameter of a CausalLM or RewardModel, one at a time."""
    cfg: ModelConfig = model.config
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        _, names, layout, stacked = hf_names(param_path, cfg)
        array = _host_array(variable[...])
        if stacked:
            for name, layer in zip(names, array):
                yield name, to_hf(layer, layout)
        else:
            yield names[0], to_hf(array, layout)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_pretrained(
    model,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    *,
    dtype: Any = None,
    extra_files: Iterable[str | os.PathLike] = (),
    writer: bool | None = None,
) -> str:
    """Writes a HF directory (config.json, generation_config.json for causal LMs, safetensors shards with an
    index when more than one, `extra_files` copied in) that transformers' from_pretrained loads.

    Everything is written into a temporary folder beside `path` and moved into place at the end, so a crash
    never leaves a half-written export. `path` must be new, empty, or an earlier export of ours holding only
    the files it wrote (`check_destination`): a folder of anyone else's files is never replaced. writer: whether
    this process writes (default: process 0 only); every process must call it, as gathering a sharded param
    is a collective. A write that fails (a full, read-only or forbidden disk) is an ExportWriteError, a
    DestinationError naming `path`, and leaves nothing behind.
    """
    cfg: ModelConfig = model.config
    if cfg.kind not in ("causal_lm", "seq_cls") or type(model).__name__ == "ValueModel":
        raise ValueError("save_pretrained writes CausalLM and RewardModel modules only")
    path = os.path.abspath(os.fspath(path))
    limit = _parse_size(max_shard_size)
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    is_writer = jax.process_index() == 0 if writer is None else writer
    if is_writer:
        check_destination(path)
        remove_leftovers(path)
    parent = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent) if is_writer else None
        if tmp is not None:
            _write_marker(tmp, [])
        shards: list[dict[str, np.ndarray]] = [{}]
        shard_bytes = 0
        shard_files: list[str] = []

        def flush():
            index = len(shard_files)
            name = f"shard-{index:05d}.safetensors"
            save_file(shards[-1], os.path.join(tmp, name), metadata={"format": "pt"})
            shard_files.append(name)

        weight_map: dict[str, int] = {}
        total = 0
        for name, array in hf_tensors(model):
            if not is_writer:
                continue
            array = array.astype(out_dtype)
            if shards[-1] and shard_bytes + array.nbytes > limit:
                flush()
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = array
            weight_map[name] = len(shard_files)
            shard_bytes += array.nbytes
            total += array.nbytes
        if not is_writer:
            return path
        flush()
        shards.clear()
        count = len(shard_files)
        if count == 1:
            os.rename(os.path.join(tmp, shard_files[0]), os.path.join(tmp, SINGLE_FILE))
        else:
            final = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
            for old, new in zip(shard_files, final):
                os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
            index = {"metadata": {"total_size": total}, "weight_map": {n: final[i] for n, i in weight_map.items()}}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        hf_config = cfg.to_hf_config(dtype_name=jnp.dtype(out_dtype).name)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if cfg.kind == "causal_lm":
            generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id) or None}
            if cfg.pad_token_id is not None:
                generation["pad_token_id"] = cfg.pad_token_id
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(generation, f, indent=2)
        for extra in extra_files:
            shutil.copy2(extra, os.path.join(tmp, os.path.basename(extra)))
        _write_marker(tmp, sorted(os.listdir(tmp)))
        _with_umask_permissions(tmp)
        _move_into_place(tmp, path)
        tmp = None
        return path
    except (OSError, SafetensorError) as err:  # a full, read-only or forbidden disk: nothing was written
        raise ExportWriteError(f"{path}: cannot write the export ({_write_problem(err)}); nothing was "
                               "written") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_problem(err: Exception) -> str:
    """The OS's words for a failed write: 'No space left on device' (safetensors: 'I/O error: ... (os error 28)')."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(err))
    return found.group(1) if found else str(err)


def process_umask() -> int:
    """The process's file-mode creation mask (0o022 usually), read without changing it where Linux says it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _with_umask_permissions(folder: str) -> None:
    """Gives `folder` and the files in it the modes new ones get from the umask (0755 / 0644 under umask 022):
    tempfile.mkdtemp makes the folder 0700, and safetensors writes its files 0600."""
    mask = process_umask()
    os.chmod(folder, 0o777 & ~mask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _move_into_place(tmp: str, path: str) -> None:
    """Renames the finished folder to `path`, replacing an older one only after the new one is complete."""
    check_destination(path)  # again: the folder may have changed while the weights were written
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


# ------------------------------------------------------------------------------------ export destinations

EXPORT_MARKER = ".rlmt-jax-export"  # JSON: the files an export wrote, and the pid/host of its writer


class DestinationError(ValueError):
    """An export destination that holds something other than an earlier export of ours."""


class ExportWriteError(DestinationError):
    """An export that could not be written (a full, read-only or forbidden disk); nothing of it was left."""


def _write_marker(folder: str, files: list[str]) -> None:
    record = {"files": [f for f in files if f != EXPORT_MARKER], "pid": os.getpid(), "host": socket.gethostname()}
    with open(os.path.join(folder, EXPORT_MARKER), "w") as f:
        json.dump(record, f)


def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, EXPORT_MARKER)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_destination(path: str | os.PathLike) -> None:
    """DestinationError unless `path` may be (re)written by an export: it does not exist, is an empty folder,
    or is an earlier export (its marker file) that holds only the files that export wrote. The current folder
    and its parents are never a destination."""
    path = os.path.abspath(os.fspath(path))
    cwd = os.getcwd()
    if os.path.commonpath([path, cwd]) == path:
        raise DestinationError(f"{path} is the current folder or one of its parents; export into a new folder")
    if not os.path.lexists(path):
        above = os.path.dirname(path)
        while not os.path.lexists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise DestinationError(f"{path}: {above} is a file, not a folder; export into a new folder")
        return
    if os.path.islink(path):
        raise DestinationError(f"{path} is a symbolic link; export into a new folder")
    if not os.path.isdir(path):
        raise DestinationError(f"{path} exists and is not a folder; export into a new folder")
    present = set(os.listdir(path))
    if not present:
        return
    marker = _read_marker(path)
    if marker is None:
        raise DestinationError(
            f"{path} already holds files that are not an rlmt-jax export ({', '.join(sorted(present)[:5])}"
            f"{', ...' if len(present) > 5 else ''}); export into a new folder (nothing was written)")
    foreign = sorted(present - set(marker.get("files", [])) - {EXPORT_MARKER})
    if foreign or any(os.path.isdir(os.path.join(path, name)) and not os.path.islink(os.path.join(path, name))
                      for name in present):
        raise DestinationError(
            f"{path} is an earlier export with other files added ({', '.join(foreign[:5]) or 'a folder'}); "
            "move them out or export into a new folder (nothing was written)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: str | os.PathLike) -> list[str]:
    """Removes the temporary folders (`.NAME.tmp-*`, `.NAME.old-*`) that an interrupted export to `path` left
    beside it, when their writer process (recorded in their marker, same host) is gone; others are reported.
    Returns the removed folders."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        if not (entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-")):
            continue
        folder = os.path.join(parent, entry)
        marker = _read_marker(folder) if os.path.isdir(folder) and not os.path.islink(folder) else None
        if marker is None:
            log.warning("left alone %s: it looks like an interrupted export but has no %s", folder, EXPORT_MARKER)
            continue
        if marker.get("host") == socket.gethostname() and marker.get("pid") != os.getpid() and not (
                entry.startswith(f".{name}.tmp-") and _pid_alive(int(marker.get("pid", 0)))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.warning("removed %s, left behind by an interrupted export", folder)
        else:
            log.warning("left alone %s: an export by process %s on %s may still be writing it",
                        folder, marker.get("pid"), marker.get("host"))
    return removed
