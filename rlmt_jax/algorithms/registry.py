"""Research variants by name: policy losses, advantage estimators, KL estimators and group filters, each a
pure jnp function registered under one name that the config selects (`algorithm.policy_loss`,
`algorithm.advantage`, `algorithm.kl_estimator`, `rollout.group_filter`).

    @register_policy_loss("mine")
    def my_loss(logprobs, old_logprobs, advantages, mask, config, *, normalizers, is_weights=None):
        ...  # -> (scalar loss, metrics dict)

Signatures (all arrays [batch, seq] unless said; `config` is the run's `algorithm:` section,
rlmt_jax.algorithms.settings.AlgorithmConfig):
  policy loss:  fn(logprobs, old_logprobs, advantages [batch] or [batch, seq], mask, config, *,
                   normalizers: Normalizers, is_weights: [batch, seq] | None) -> (loss, metrics)
                Normalize with the whole-batch `normalizers` (never counts of `mask` itself) so the
                losses of micro-batches add up to the batch's loss.
  advantage:    fn(scores [batch], mask, config, *, group_size: int, values: [batch, seq] | None)
                -> (advantages [batch] or [batch, seq], returns [batch, seq] | None)
                Rows are groups of `group_size` consecutive samples of one prompt (rollout.n).
  KL estimator: fn(logprobs, ref_logprobs) -> per-token estimate of KL(pi || pi_ref)
  group filter: fn(rewards [groups, n]) -> keep [groups] bool   (`rollout.group_filter`, DAPO's dynamic
                sampling: the trainer samples more prompts until the step has enough kept groups)

A user's module registers its own with the same decorators and is imported by
`rlmt-jax train ... --import my_variants` (or listed under the `rlmt_jax.variants` entry point group).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from rlmt_jax.core.errors import UserError

ENTRY_POINT_GROUP = "rlmt_jax.variants"


@dataclasses.dataclass(frozen=True)
class Registered:
    """A registered function and what the trainer must provide for it."""

    name: str
    fn: Callable
    needs_critic: bool = False  # advantages: reads the critic's values (the algorithm must train one)
    min_group_size: int = 1  # advantages: the samples per prompt (rollout.n) it needs


class Registry:
    """Names -> functions of one kind; an unknown name is a UserError listing the registered ones."""

    def __init__(self, kind: str, config_key: str):
        self.kind, self.config_key = kind, config_key
        self._entries: dict[str, Registered] = {}

    def register(self, name: str, **needs) -> Callable[[Callable], Callable]:
        def decorate(fn: Callable) -> Callable:
            if name in self._entries and self._entries[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered already (by {self._entries[name].fn.__module__})")
            self._entries[name] = Registered(name, fn, **needs)
            return fn

        return decorate

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def entry(self, name: str) -> Registered:
        if name not in self._entries:
            raise UserError(f"config key '{self.config_key}': unknown {self.kind} {name!r}; registered: "
                            f"{', '.join(self.names())} (a module of yours registers more: --import MODULE)")
        return self._entries[name]

    def __call__(self, name: str) -> Callable:
        return self.entry(name).fn

    def __contains__(self, name: str) -> bool:
        return name in self._entries


POLICY_LOSSES = Registry("policy loss", "algorithm.policy_loss")
ADVANTAGES = Registry("advantage estimator", "algorithm.advantage")
KL_ESTIMATORS = Registry("KL estimator", "algorithm.kl_estimator")
GROUP_FILTERS = Registry("group filter", "rollout.group_filter")


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` becomes the policy loss `algorithm.policy_loss=name` (signature: module docstring)."""
    return POLICY_LOSSES.register(name)


def register_advantage(name: str, *, needs_critic: bool = False, min_group_size: int = 1):
    """Decorator: `fn` becomes the advantage estimator `algorithm.advantage=name`. needs_critic: it reads
    the critic's values (only algorithms that train a critic may select it); min_group_size: the smallest
    rollout.n it works with."""
    return ADVANTAGES.register(name, needs_critic=needs_critic, min_group_size=min_group_size)


def register_kl_estimator(name: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn(logprobs, ref_logprobs) -> [batch, seq]` becomes `algorithm.kl_estimator=name`."""
    return KL_ESTIMATORS.register(name)


def register_group_filter(name: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn(rewards [groups, n]) -> [groups] bool` (True: train on the group) becomes
    `rollout.group_filter=name`."""
    return GROUP_FILTERS.register(name)


_entry_points_loaded = False


def load_entry_points() -> list[str]:
    """Imports every module of the `rlmt_jax.variants` entry point group (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    done = []
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as err:  # noqa: BLE001: any failure of the user's module is reported by name
            raise UserError(f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}): cannot import it "
                            f"({type(err).__name__}: {err})") from err
        done.append(point.value)
    return done


def import_variants(modules: list[str] | tuple[str, ...] = (), entry_points: bool = True) -> list[str]:
    """Imports the modules that register a user's variants: importable names (`my_variants`) or file paths
    (`./my_variants.py`), then every module of the `rlmt_jax.variants` entry point group. Returns what it
    imported. A module that cannot be imported is a UserError naming it."""
    done = []
    for name in modules:
        try:
            if name.endswith(".py") or Path(name).is_file():
                path = Path(name)
                spec = importlib.util.spec_from_file_location(path.stem, path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001: any failure of the user's module is reported by name
            raise UserError(f"--import {name}: cannot import it ({type(err).__name__}: {err})") from err
        done.append(name)
    if entry_points:
        done += load_entry_points()
    return done
