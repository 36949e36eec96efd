"""Every program of an RL step is compiled in the first step only: from step 2 on a run reuses them all.

A program compiled again means an input changed its type, shape, sharding or a static argument between
steps (a param placed off the mesh at step 1 and on it after the first update, a function made anew per
call); on CPU each costs seconds per step, on an 8B model minutes. Programs are counted from jax's compile
log (`jax.log_compiles`), per step of a 3-step tiny run in this process.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlmt_jax.settings.config import MeshConfig, resolve
from rlmt_jax.scale.mesh import make_mesh, place_unplaced_params
from rlmt_jax.trainer.loop import Trainer, train

FAST = [
    "rollout.n=2", "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=96", "run.total_steps=3", "checkpoint.save_every=1", "checkpoint.async_save=false",
    "logging.tensorboard=false", "optimizer.micro_batch_size=4", "run.export_at_end=false",
    # the reward model scores every answer from step 1 on (with a format penalty, a step whose answers are all
    # malformed calls no scorer, and the first that has one compiles it), in one bucket (a longer answer later would
    # compile the next: one program per bucket is by design, rlmt_jax.rollout.rewards)
    "template.format_penalty=null", "reward.max_length=128",
]
ALGORITHMS = {
    "grpo": [],
    "ppo": ["algorithm.name=ppo", "rollout.n=1", "algorithm.kl_coef=0.0"],  # as tests/test_trainer.py
}


class CompileLog(logging.Handler):
    """The names of the programs jax compiles ('jit(train_step)', ...), by the step that was running."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.step = 0
        self.programs: dict[int, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("Compiling %s"):
            self.programs.setdefault(self.step, []).append(str(record.args[0]))


@pytest.fixture
def compile_log(monkeypatch):
    log = CompileLog()
    step = Trainer._step

    def counted_step(trainer, prompts):
        log.step += 1
        return step(trainer, prompts)

    monkeypatch.setattr(Trainer, "_step", counted_step)
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(log)
    try:
        with jax.log_compiles(True):
            yield log
    finally:
        logger.removeHandler(log)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_no_program_is_compiled_after_the_first_step(algorithm, tmp_path, tiny_cache, compile_log):
    train(resolve(None, [*FAST, *ALGORITHMS[algorithm], f"run.output_dir={tmp_path / 'run'}"]))
    assert compile_log.step == 3
    first = set(compile_log.programs[1])
    expected = {"jit(train_step)", "jit(compute_logprobs)"} | ({"jit(compute_values)"} if algorithm == "ppo" else set())
    assert expected <= first  # the log is read: step 1 compiles the update programs
    assert compile_log.programs.get(2, []) == []
    assert compile_log.programs.get(3, []) == []


def test_a_param_made_off_the_mesh_is_placed_on_it_by_its_logical_axes():
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    placed = jax.device_put(np.ones((4, 2), np.float32), NamedSharding(mesh, PartitionSpec(None, None)))
    state = nnx.State({"kernel": nnx.Param(placed, logical_axes=("embed", "labels")),
                       "head": nnx.Param(jax.numpy.arange(3.0), logical_axes=("labels",))})
    assert not isinstance(state["head"].get_value().sharding, NamedSharding)  # made on the default device
    result = place_unplaced_params(state, mesh)
    assert result["kernel"].get_value() is placed  # already on the mesh: kept
    head = result["head"].get_value()
    assert head.sharding == NamedSharding(mesh, PartitionSpec(None))
    np.testing.assert_array_equal(head, [0.0, 1.0, 2.0])
    assert result["head"].get_metadata()["logical_axes"] == ("labels",)
