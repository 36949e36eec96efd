"""rlmt-jax: RL with Model-rewarded Thinking (RLMT) in JAX/Flax NNX.

One package per stage of the flow, each importing only the ones below it (the layers are import-linter
contracts in pyproject.toml, checked by tests/test_layers.py):

    cli, commands       the `rlmt-jax` command and its subcommands
    trainer | plans     the loop that wires a rollout stage to an update stage | `rlmt-jax plan`
    rollout | training | run
                        prompts -> scored groups | scored groups -> an update | checkpoints, metrics, lock
    inputs | scale      prompts, templates, tiny models | mesh, multi-host, compile cache
    settings            the run configuration
    algorithms          losses, advantages, KL estimators, per-algorithm specs: pure functions by name
    core                errors, atomic files, JSON lines
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Modules that moved into the stage packages in 0.1.0, still importable by their old names until 0.2.
MOVED_MODULES = {
    "errors": "core.errors", "files": "core.files", "jsonl": "core.jsonl",
    "objectives": "algorithms.objectives",
    "config": "settings.config", "typed_config": "settings.schema",
    "data": "inputs.data", "templates": "inputs.templates", "toy_tokenizer": "inputs.toy_tokenizer",
    "tiny": "inputs.tiny",
    "mesh": "scale.mesh", "multihost": "scale.multihost", "compile_cache": "scale.compile_cache",
    "host_memory": "scale.host_memory",
    "sampling": "rollout.sampling", "next_token": "rollout.next_token", "rewards": "rollout.rewards",
    "rollouts": "rollout.scored",
    "train_step": "training.train_step", "optim": "training.optim", "sequences": "training.sequences",
    "checkpoint": "run.checkpoint", "checksums": "run.checksums", "resume": "run.resume",
    "run_dir": "run.run_dir", "run_lock": "run.lock", "stop_signals": "run.stop_signals", "metrics": "run.metrics",
    "memory_plan": "plans.memory_plan", "time_plan": "plans.time_plan", "known_models": "plans.known_models",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import rlmt_jax.config` (an old path) gives a module whose attributes are the new module's, with a
    DeprecationWarning naming the new path."""

    def find_spec(self, fullname, path, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix == __name__ and old in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        new_name = f"{__name__}.{MOVED_MODULES[module.__name__.partition('.')[2]]}"
        warnings.warn(f"{module.__name__} moved to {new_name}; the old path goes away in rlmt-jax 0.2",
                      DeprecationWarning, stacklevel=2)
        new = importlib.import_module(new_name)
        module.__getattr__ = lambda name: getattr(new, name)
        module.__doc__ = new.__doc__


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModule())
