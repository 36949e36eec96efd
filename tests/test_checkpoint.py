"""Checkpoints: round trips of every item kind, retention, async writes, fallback past damaged steps."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlmt_jax.run.checkpoint import (
    COMMIT_MARKER,
    CheckpointStore,
    CheckpointWriteError,
    NonFiniteError,
    params_only,
    rng_from_json,
    rng_to_json,
)
from rlmt_jax.core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


class TinyPolicy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.layers = nnx.List([nnx.Linear(8, width, rngs=rngs), nnx.Linear(width, 4, rngs=rngs)])
        self.norm = nnx.RMSNorm(4, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def policy_params(seed: int) -> nnx.State:
    return nnx.state(TinyPolicy(nnx.Rngs(seed)), nnx.Param)


def abstract_params() -> nnx.State:
    return jax.eval_shape(lambda: nnx.state(TinyPolicy(nnx.Rngs(0)), nnx.Param))


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


@jax.jit
def stepped_opt_state(params: dict) -> optax.OptState:
    """Adam state after one update, so mu, nu and count are not their zero init."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, state = TX.update(grads, TX.init(params), params)
    return state


def run_items(seed: int) -> dict:
    params = policy_params(seed)
    critic = {"head": {"kernel": jax.random.normal(jax.random.key(seed + 100), (4, 1))}}
    return {
        "params": params,
        "opt_state": stepped_opt_state(nnx.to_pure_dict(params)),
        "critic_params": critic,
        "critic_opt_state": TX.init(critic),
        "data_iter": {"epoch": 1, "index": 37 + seed, "seed": 1234},
        "rng": {"sample": jax.random.key(seed), "legacy": jax.random.PRNGKey(seed + 1)},
        "meta": {"config_hash": "abc123"},
    }


def abstract_run_items() -> dict:
    params = abstract_params()
    critic = {"head": {"kernel": jax.ShapeDtypeStruct((4, 1), jnp.float32)}}
    return {
        "params": params,
        "opt_state": jax.eval_shape(TX.init, nnx.to_pure_dict(params)),
        "critic_params": critic,
        "critic_opt_state": jax.eval_shape(TX.init, critic),
        "data_iter": None,
        "rng": None,
        "meta": None,
    }


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def truncate_largest_file(directory: Path) -> Path:
    largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    assert size > 1000, "the params should live in a file large enough to truncate"
    with open(largest, "r+b") as f:
        f.truncate(size // 2)
    return largest


def save_steps(store: CheckpointStore, steps, seed_of=lambda s: s, metrics_of=None):
    for step in steps:
        metrics = metrics_of(step) if metrics_of else None
        assert store.save(step, run_items(seed_of(step)), metrics, final=True)
    store.wait_until_finished()


# ------------------------------------------------------------------------------------------ round trip


def test_every_item_kind_round_trips_with_equal_arrays(tmp_path):
    expected = run_items(seed=3)
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        assert store.save(3, expected, final=True)
        restored = store.restore(abstract_run_items())

    assert restored.step == 3
    items = restored.items
    assert isinstance(items["params"], nnx.State)
    assert_trees_equal(items["params"], expected["params"])
    # optax namedtuples come back as themselves, so the optimizer can continue from them
    assert_trees_equal(items["opt_state"], expected["opt_state"])
    assert int(items["opt_state"][1][0].count) == 1
    assert_trees_equal(items["critic_params"], expected["critic_params"])
    assert_trees_equal(items["critic_opt_state"], expected["critic_opt_state"])
    assert items["data_iter"] == {"epoch": 1, "index": 40, "seed": 1234}
    assert jax.random.key_impl(items["rng"]["sample"]) == jax.random.key_impl(expected["rng"]["sample"])
    np.testing.assert_array_equal(
        jax.random.key_data(items["rng"]["sample"]), jax.random.key_data(expected["rng"]["sample"])
    )
    np.testing.assert_array_equal(items["rng"]["legacy"], np.array([0, 4], np.uint32))
    assert items["meta"]["config_hash"] == "abc123"
    assert items["meta"]["step"] == 3
    assert items["meta"]["versions"]["jax"] == jax.__version__
    # each process keeps its own data iterator state
    saved_iter = tmp_path / "checkpoints" / "3" / "data_iter" / "process_0-of-1.json"
    assert json.loads(saved_iter.read_text()) == {"epoch": 1, "index": 40, "seed": 1234}

    # the restored State drives a model exactly as the saved one did
    model = TinyPolicy(nnx.Rngs(99))
    nnx.update(model, items["params"])
    reference = TinyPolicy(nnx.Rngs(3))
    x = jnp.arange(16.0).reshape(2, 8) / 16
    np.testing.assert_array_equal(model(x), reference(x))


def test_restore_leaves_the_abstract_target_untouched(tmp_path):
    target = abstract_params()
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        store.save(1, {"params": policy_params(1)}, final=True)
        store.restore({"params": target})
    assert isinstance(target["layers"][0]["kernel"].get_value(), jax.ShapeDtypeStruct)


def test_rng_json_round_trip_keeps_impl_shape_and_words():
    keys = {"split": jax.random.split(jax.random.key(7, impl="rbg"), 3), "raw": jax.random.PRNGKey(5)}
    encoded = rng_to_json(keys)
    assert encoded["raw"] == {"impl": None, "shape": [2], "data": [0, 5]}
    assert encoded["split"]["impl"] == "rbg" and encoded["split"]["shape"] == [3, 4]
    decoded = rng_from_json(encoded)
    np.testing.assert_array_equal(jax.random.key_data(decoded["split"]), jax.random.key_data(keys["split"]))
    np.testing.assert_array_equal(decoded["raw"], keys["raw"])


# ------------------------------------------------------------------------------------ when and what to keep


def test_saves_every_n_steps_and_the_final_step_once(tmp_path):
    with CheckpointStore.for_run(tmp_path, save_every=2, keep=10, async_save=False) as store:
        saved = [step for step in range(1, 6) if store.save(step, {"params": policy_params(step)}, final=step == 5)]
        assert saved == [2, 4, 5]
        assert store.save(5, {"params": policy_params(5)}, final=True) is False  # already there
        assert store.all_steps() == [2, 4, 5]


def test_keeps_the_last_k_plus_the_best_by_max_metric(tmp_path):
    rewards = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4}
    with CheckpointStore.for_run(tmp_path, keep=2, best_metric="reward", best_mode="max", async_save=False) as store:
        save_steps(store, rewards, metrics_of=lambda s: {"reward": rewards[s], "kl": 0.0})
        assert store.all_steps() == [2, 4, 5]
        assert store.best_step() == 2
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert on_disk == [2, 4, 5]


def test_keeps_the_best_by_min_metric_and_ranks_nan_worst(tmp_path):
    losses = {1: 0.5, 2: float("nan"), 3: 0.2, 4: 0.7, 5: 0.9, 6: 0.8}
    with CheckpointStore.for_run(tmp_path, keep=2, best_metric="loss", best_mode="min", async_save=False) as store:
        save_steps(store, losses, metrics_of=lambda s: {"loss": losses[s]})
        assert store.all_steps() == [3, 5, 6]
        assert store.best_step() == 3


def test_best_metric_missing_from_the_metrics_is_a_user_error(tmp_path):
    with CheckpointStore.for_run(tmp_path, best_metric="reward", async_save=False) as store:
        with pytest.raises(UserError, match="'reward' is not among the step's metrics \\['kl'\\]"):
            store.save(1, {"params": policy_params(1)}, {"kl": 0.1}, final=True)


def test_async_save_then_restore_equals_even_after_the_source_buffers_are_freed(tmp_path):
    items = run_items(seed=4)
    expected = jax.tree.map(np.asarray, nnx.to_pure_dict(items["params"]))
    with CheckpointStore.for_run(tmp_path, async_save=True) as store:
        assert store.save(10, items, final=True)
        # a trainer donates its params to the next update right after save returns
        for leaf in jax.tree.leaves(items["params"]):
            leaf.delete()
        assert store.save(10, items, final=True) is False  # the final save of a step still being written
        store.wait_until_finished()
        assert store.latest_step() == 10
        restored = store.restore({"params": jax.eval_shape(lambda: expected)})
    assert_trees_equal(restored.items["params"], expected)


# ------------------------------------------------------------------------------------------- damage


def test_truncated_newest_checkpoint_falls_back_to_the_one_before_with_a_warning(tmp_path, caplog):
    with CheckpointStore.for_run(tmp_path, keep=3, async_save=False) as store:
        save_steps(store, [1, 2])
        truncate_largest_file(tmp_path / "checkpoints" / "2" / "params")
        with caplog.at_level(logging.WARNING, logger="rlmt_jax.run.checkpoint"):
            restored = store.restore(abstract_run_items())
        assert restored.step == 1
        assert_trees_equal(restored.items["params"], policy_params(1))
        assert restored.items["data_iter"]["index"] == 38
        assert any("checkpoint step 2" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
        # the damaged step is kept aside, so the resumed run can write step 2 again
        assert (tmp_path / "checkpoints" / "2.unusable").is_dir()
        assert store.latest_step() == 1
        assert store.save(2, run_items(22), final=True)
        assert store.restore({"params": abstract_params()}).step == 2


def test_step_dir_without_commit_marker_is_never_taken_as_a_checkpoint_and_is_saved_again(tmp_path, caplog):
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        save_steps(store, [1])
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "1", ckpts / "2")
    (ckpts / "2" / COMMIT_MARKER).unlink()
    reader = CheckpointStore.for_run(tmp_path, read_only=True)  # a reader only ignores it
    assert reader.latest_step() == 1 and (ckpts / "2").is_dir()
    with caplog.at_level(logging.WARNING, logger="rlmt_jax.run.checkpoint"):
        store = CheckpointStore.for_run(tmp_path, save_every=2, async_save=False)
    assert any("uncommitted checkpoint step dir" in r.getMessage() and r.getMessage().endswith("saves that step again")
               for r in caplog.records)
    assert not (ckpts / "2").exists()
    assert store.latest_step() == 1
    assert store.restore({"params": abstract_params()}).step == 1
    assert store.should_save(2)  # the interrupted step is written again, and holds the new values
    save_steps(store, [2], seed_of=lambda s: 7)
    assert_trees_equal(store.restore({"params": abstract_params()}).items["params"], policy_params(7))
    store.close()


KILLED_WRITER = """
import os, sys
import jax
from flax import nnx
from orbax.checkpoint._src.path import atomicity
from rlmt_jax.run.checkpoint import CheckpointStore

store = CheckpointStore.for_run(sys.argv[1], async_save=True)
params = {"w": jax.numpy.arange(4096.0).reshape(64, 64)}
store.save(1, {"params": params}, final=True)
store.wait_until_finished()

async def die_before_commit(self):  # all files written, the rename to the final name never happens
    os._exit(9)

atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
store.save(2, {"params": {"w": params["w"] + 1}}, final=True)
store.wait_until_finished()
"""


def test_killed_writer_leftover_is_ignored_and_cleaned(tmp_path, caplog):
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 9, result.stderr[-2000:]
    ckpts = tmp_path / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith("2.orbax-checkpoint-tmp")]
    assert len(leftovers) == 1

    with caplog.at_level(logging.WARNING, logger="rlmt_jax.run.checkpoint"):
        store = CheckpointStore.for_run(tmp_path, async_save=False)
    assert any("unfinished checkpoint write of step 2" in r.getMessage() for r in caplog.records)
    assert store.all_steps() == [1]
    restored = store.restore({"params": None})
    assert restored.step == 1
    np.testing.assert_array_equal(restored.items["params"]["w"], np.arange(4096.0).reshape(64, 64))
    assert store.save(2, {"params": {"w": jnp.zeros((64, 64))}}, final=True)
    store.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2"]


def test_run_dir_without_checkpoints_restores_none(tmp_path):
    reader = CheckpointStore.for_run(tmp_path / "fresh", read_only=True)
    assert reader.latest_step() is None
    assert reader.restore({"params": abstract_params()}) is None
    assert not (tmp_path / "fresh").exists()  # a reader creates nothing
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        assert store.latest_step() is None
        assert store.restore({"params": abstract_params()}) is None


def test_every_checkpoint_damaged_is_a_user_error_listing_each_step(tmp_path):
    with CheckpointStore.for_run(tmp_path, keep=3, async_save=False) as store:
        save_steps(store, [1, 2])
        for step in (1, 2):
            truncate_largest_file(tmp_path / "checkpoints" / str(step) / "params")
        with pytest.raises(UserError, match="no usable checkpoint .*step 2: .*step 1: "):
            store.restore({"params": abstract_params()})
        # nothing is renamed when no step restores: the cause may be common to all of them
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_a_shape_that_differs_from_the_model_names_the_tensor_and_keeps_the_checkpoint(tmp_path):
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        save_steps(store, [1])
        wider = jax.eval_shape(lambda: nnx.state(TinyPolicy(nnx.Rngs(0), width=32), nnx.Param))
        expected = r"tensor params\.layers\.0\.bias has shape \(16,\), the model expects \(32,\)"
        with pytest.raises(UserError, match=expected):
            store.restore({"params": wider})
        assert store.latest_step() == 1


def test_an_item_the_checkpoint_was_saved_without_is_a_user_error_not_damage(tmp_path):
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        store.save(1, {"params": policy_params(1)}, final=True)
        critic = {"head": {"kernel": jax.ShapeDtypeStruct((4, 1), jnp.float32)}}
        with pytest.raises(UserError, match=r"has no \['critic_params'\] \(it holds \['meta', 'params'\]\)"):
            store.restore({"params": abstract_params(), "critic_params": critic})
        assert store.latest_step() == 1  # not set aside as damaged


def flip_one_byte(path: Path) -> None:
    """Flips the lowest bit of the middle byte of the file."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 1]))


def test_a_flipped_byte_in_a_params_file_is_caught_by_its_checksum_and_restore_falls_back(tmp_path, caplog):
    def weights(step):
        return {"w": jax.random.normal(jax.random.key(step), (64, 64))}

    with CheckpointStore.for_run(tmp_path, keep=3, async_save=False) as store:
        for step in (1, 2):
            store.save(step, {"params": weights(step), "opt_state": stepped_opt_state(weights(step))}, final=True)
    meta = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert "params/w" in meta["checksums"] and "opt_state/1.0.mu.w" in meta["checksums"]  # item/path of each array
    data = max((tmp_path / "checkpoints" / "2" / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    flip_one_byte(data)  # the file still decodes: one float of w has its lowest mantissa bit flipped
    with caplog.at_level(logging.WARNING, logger="rlmt_jax.run.checkpoint"):
        store = CheckpointStore.for_run(tmp_path, keep=3, async_save=False)
        restored = store.restore({"params": jax.eval_shape(lambda: weights(0))})
    assert restored.step == 1
    np.testing.assert_array_equal(restored.items["params"]["w"], weights(1)["w"])
    assert "array params/w of step 2 does not match its saved checksum" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2.unusable"]
    store.close()
    # export reads params into host memory: the same sums are checked there
    (tmp_path / "checkpoints" / "2.unusable").rename(tmp_path / "checkpoints" / "2")
    np.testing.assert_array_equal(params_only(tmp_path)["w"], weights(1)["w"])


def test_arrays_with_nan_or_inf_are_never_saved(tmp_path):
    items = run_items(1)
    items["params"] = jax.tree.map(lambda x: x.at[0].set(jnp.inf) if x.ndim == 1 else x, items["params"])
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        with pytest.raises(NonFiniteError, match=r"step 3: not saved, params/layers\.0\.bias.* NaN or inf"):
            store.save(3, items, final=True)
        assert store.all_steps() == []


def test_a_symlinked_step_dir_is_refused_when_the_store_opens(tmp_path):
    with CheckpointStore.for_run(tmp_path, async_save=False) as store:
        save_steps(store, [1])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "checkpoints" / "2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointWriteError, match=r"checkpoints/2 is a symbolic link"):
        CheckpointStore.for_run(tmp_path, async_save=False)
    assert CheckpointStore.for_run(tmp_path, read_only=True).latest_step() == 1


FAILING_DISK = """
import json, subprocess, sys
import jax
import rlmt_jax.run.checkpoint as ckpt
from rlmt_jax.run.checkpoint import CheckpointStore, CheckpointWriteError

mount, case = sys.argv[1], sys.argv[2]
store = CheckpointStore(mount + "/checkpoints", save_every=1, keep=3, async_save=True)
store.save(1, {"params": {"w": jax.random.normal(jax.random.key(1), (100, 100))}})
store.wait_until_finished()
big = jax.random.normal(jax.random.key(2), (1000, 1000))  # 4 MB on a 2 MB disk
if case == "read_only":
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    big = big[:100, :100]
if case == "full_while_writing":
    ckpt.SPACE_MARGIN = 0.0  # the free-space check passes: orbax's write itself fails
try:
    store.save(2, {"params": {"w": big}})
    store.wait_until_finished()
    print(json.dumps({"error": None}))
except CheckpointWriteError as err:
    store.close()
    reader = CheckpointStore(mount + "/checkpoints", read_only=True)
    print(json.dumps({"error": str(err), "steps": reader.all_steps(),
                      "restored": reader.restore({"params": None}).step}))
"""


@pytest.mark.parametrize("case", ["read_only", "full", "full_while_writing"])
def test_a_read_only_or_full_disk_ends_in_one_line_and_keeps_the_earlier_checkpoints(tmp_path, case):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = subprocess.run([sys.executable, "-c", FAILING_DISK, str(mount), case], capture_output=True,
                                text=True, cwd=REPO_ROOT, timeout=60)  # orbax waited 300 s for a read-only dir
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {"read_only": "Read-only file system", "full": "MiB free, 4 MiB needed",
                "full_while_writing": "No space left on device"}[case]
    assert expected in outcome["error"] and "\n" not in outcome["error"]
    assert outcome["error"].endswith("the checkpoints of steps [1] are intact")
    assert outcome["steps"] == [1] and outcome["restored"] == 1
    assert "Traceback" not in result.stderr  # orbax's per-thread tracebacks are not printed


# ---------------------------------------------------------------------------------------------- export


def test_params_only_reads_the_policy_from_a_run_dir_a_checkpoints_dir_or_a_step_dir(tmp_path):
    with CheckpointStore.for_run(tmp_path, keep=3, async_save=False) as store:
        save_steps(store, [1, 2])
    newest = params_only(tmp_path)
    assert isinstance(newest["layers"][0]["kernel"], np.ndarray)
    assert sorted(newest["layers"]) == [0, 1]  # list indices as ints, as nnx.to_pure_dict gives them
    assert_trees_equal(newest, nnx.to_pure_dict(policy_params(2)))
    assert_trees_equal(params_only(tmp_path / "checkpoints"), newest)
    assert_trees_equal(params_only(tmp_path / "checkpoints" / "1"), nnx.to_pure_dict(policy_params(1)))

    model = TinyPolicy(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, newest)
    nnx.update(model, state)
    x = jnp.ones((1, 8))
    np.testing.assert_allclose(model(x), TinyPolicy(nnx.Rngs(2))(x), rtol=0, atol=0)


def test_params_only_on_an_empty_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints in"):
        params_only(tmp_path)


# --------------------------------------------------------------------------------------------- sharding

SHARDED_RESTORE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rlmt_jax.run.checkpoint import CheckpointStore

assert jax.device_count() == 8, jax.devices()
w = jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32)
b = jnp.arange(32, dtype=jnp.float32)
with CheckpointStore.for_run(sys.argv[1], async_save=False) as store:
    store.save(1, {"params": {"w": w, "b": b}}, final=True)   # written from one device

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
target = {
    "w": jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", "tensor"))),
    "b": jax.ShapeDtypeStruct((32,), jnp.float32, sharding=NamedSharding(mesh, P("tensor"))),
}
with CheckpointStore.for_run(sys.argv[1], read_only=True) as store:
    params = store.restore({"params": target}).items["params"]
for name in ("w", "b"):
    array = params[name]
    assert array.sharding == target[name].sharding, array.sharding
    print(name, sorted({tuple(s.data.shape) for s in array.addressable_shards}), len(array.addressable_shards))
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray({"w": w, "b": b}[name])[shard.index])
"""


def test_restore_onto_a_mesh_places_each_shard_on_its_device(tmp_path):
    from clusters import simulated_devices  # not at the top: DAMAGED_NEWEST's process imports this module

    env = simulated_devices(8)
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_RESTORE, str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # w [16, 32] over fsdp=4 x tensor=2 -> [4, 16] per device; b [32] over tensor=2 -> [16], replicated on fsdp
    assert "w [(4, 16)] 8" in result.stdout
    assert "b [(16,)] 8" in result.stdout


def test_opening_a_store_leaves_no_orbax_thread_running(tmp_path):
    # orbax cleans temporary folders in a thread as its manager opens; a run stopped by a data error right after
    # ended the interpreter under that thread, which then printed a 42-line traceback below the one-line error
    import threading

    before = set(threading.enumerate())
    store = CheckpointStore(tmp_path / "checkpoints", async_save=True)
    try:
        started = [t for t in set(threading.enumerate()) - before if t.is_alive()]
        assert [t for t in started if type(t).__name__ == "_SignalingThread"] == []
    finally:
        store.close()


def test_a_failed_orbax_run_closes_its_loop_only_after_the_reads_it_left_in_flight(tmp_path, monkeypatch):
    """Orbax ran each restore in a loop it closed at the first failed array; the other arrays' reads, completed
    into that loop from tensorstore's threads, each printed `RuntimeError: Event loop is closed`."""
    import asyncio
    import threading

    from orbax.checkpoint._src import asyncio_utils

    CheckpointStore(tmp_path / "checkpoints", async_save=False).close()  # a store has orbax close loops in order
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    completed = []

    async def read(delay: float, fails: bool = False):  # like a tensorstore read, completed by another thread
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        threading.Timer(delay, lambda: loop.call_soon_threadsafe(done.set_result, None)).start()
        if fails:
            raise ValueError("OUT_OF_RANGE: a truncated file")
        await done
        completed.append(delay)

    async def restore():
        await asyncio.gather(read(0.0, fails=True), read(0.2), read(0.3))

    with pytest.raises(ValueError, match="OUT_OF_RANGE"):
        asyncio_utils.run_sync(restore())
    assert sorted(completed) == [0.2, 0.3]
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.join()
    assert thread_errors == []


DAMAGED_NEWEST = """
import sys
import jax.numpy as jnp
from rlmt_jax.run.checkpoint import CheckpointStore
from tests.test_checkpoint import truncate_largest_file
from pathlib import Path

run_dir = Path(sys.argv[1])
params = {f"w{i}": jnp.arange(40000.0).reshape(200, 200) + i for i in range(40)}  # many arrays read at once
with CheckpointStore.for_run(run_dir, async_save=False) as store:
    for step in (1, 2):
        store.save(step, {"params": params}, final=True)
truncate_largest_file(run_dir / "checkpoints" / "2" / "params")
with CheckpointStore.for_run(run_dir, async_save=False) as store:
    print("restored", store.restore({"params": None}).step)
"""


def test_falling_back_past_a_damaged_newest_checkpoint_prints_no_event_loop_tracebacks(tmp_path):
    result = subprocess.run([sys.executable, "-c", DAMAGED_NEWEST, str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "restored 1"
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[-3000:]
