"""Variants registered from a user's own module (by --import, a file path or an entry point) are found by
name; one trains a tiny run through the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rlmt_jax.algorithms import (
    ADVANTAGES,
    GROUP_FILTERS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    import_variants,
    register_policy_loss,
)
from rlmt_jax.algorithms import registry
from rlmt_jax.cli import main
from rlmt_jax.core.errors import UserError
from tests.test_cli import SHORT

USER_MODULE = '''
"""A user's variants, outside the package."""
import jax.numpy as jnp

from rlmt_jax.algorithms import aggregation_weights, register_advantage, register_policy_loss, token_advantages
from rlmt_jax.algorithms import weighted_sum


@register_policy_loss("mine")
def reinforce_token_mean(logprobs, old_logprobs, advantages, mask, config, *, normalizers, is_weights=None):
    """-A logp, averaged over the batch's tokens; marker = 42 * (sum of the token weights = 1)."""
    w = aggregation_weights(mask, "token_mean", normalizers)
    adv = token_advantages(advantages, logprobs.shape)
    return weighted_sum(-adv * logprobs, w), {"mine_marker": 42.0 * weighted_sum(jnp.ones_like(logprobs), w)}


@register_advantage("my_centred", min_group_size=2)
def centred(scores, mask, config, *, group_size, values=None):
    groups = scores.reshape(-1, group_size)
    return (groups - groups.mean(axis=1, keepdims=True)).reshape(scores.shape), None
'''


@pytest.fixture
def clean_registries(monkeypatch):
    """Registrations made by a test are undone after it (other tests list the registered names)."""
    for reg in (POLICY_LOSSES, ADVANTAGES, KL_ESTIMATORS, GROUP_FILTERS):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_a_variant_from_a_user_module_outside_the_package_trains_through_the_cli(tmp_path, tiny_cache,
                                                                                clean_registries):
    user_dir = tmp_path / "user_code"
    user_dir.mkdir()
    (user_dir / "my_variants.py").write_text(USER_MODULE)
    run_dir = tmp_path / "run"
    env = {**os.environ, "RLMT_JAX_CACHE": str(tiny_cache),
           "PYTHONPATH": os.pathsep.join(p for p in (str(user_dir), os.environ.get("PYTHONPATH")) if p)}
    short = [o for o in SHORT if not o.startswith("run.total_steps=")]  # a key may be set once
    command = [sys.executable, "-m", "rlmt_jax.cli", "train", *short, "run.total_steps=1", f"run.output_dir={run_dir}",
               "algorithm.policy_loss=mine", "algorithm.advantage=my_centred", "--import", "my_variants"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["mine_marker"] == pytest.approx(42.0, rel=1e-5)  # the user's loss made the update
    assert "pg_clipfrac" not in rows[0]  # ... and ppo_clip did not
    assert abs(rows[0]["rollout_ratio_mean"] - 1.0) < 1e-3  # the sampler/trainer ratio is logged every step
    config = (run_dir / "config.yaml").read_text()
    assert "policy_loss: mine" in config and "advantage: my_centred" in config

    # without --import the name is unknown, and the error lists what is registered
    result = subprocess.run(command[:-2], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "unknown policy loss 'mine'; registered: cispo, dapo, drgrpo, gspo, ppo_clip" in result.stderr

    # the run's saved config names the variant: export reads it with the same --import (here by file path)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf"), "--import",
                 str(user_dir / "my_variants.py")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_import_variants_takes_a_file_path_and_names_a_module_that_fails(tmp_path, clean_registries):
    path = tmp_path / "elsewhere" / "half_kl.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent('''
        from rlmt_jax.algorithms import register_kl_estimator

        @register_kl_estimator("half_k2")
        def half_k2(logprobs, ref_logprobs):
            return 0.25 * (ref_logprobs - logprobs) ** 2
    '''))
    assert "half_k2" not in KL_ESTIMATORS
    assert import_variants([str(path)], entry_points=False) == [str(path)]
    assert KL_ESTIMATORS("half_k2")(0.0, 2.0) == 1.0
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match=r"--import .*broken.py: cannot import it \(RuntimeError: boom\)"):
        import_variants([str(broken)], entry_points=False)
    with pytest.raises(UserError, match=r"--import no_such_module_xyz: cannot import it \(ModuleNotFoundError"):
        import_variants(["no_such_module_xyz"], entry_points=False)


def test_entry_point_group_modules_register_their_variants(monkeypatch, clean_registries):
    class EntryPoint:
        name, value = "mine", "my_pkg.variants"

        def load(self):
            register_policy_loss("from_entry_point")(lambda *a, **k: None)

    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    assert registry.load_entry_points() == ["my_pkg.variants"]
    assert "from_entry_point" in POLICY_LOSSES
    assert registry.load_entry_points() == []  # once per process


def test_a_name_registered_twice_by_different_functions_is_an_error(clean_registries):
    register_policy_loss("twice")(len)
    register_policy_loss("twice")(len)  # the same function again (a module imported twice): fine
    with pytest.raises(ValueError, match="policy loss 'twice' is registered already"):
        register_policy_loss("twice")(abs)


def readme_variants_section() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text[text.index("## Research variants"):text.index("## Layout")]


def test_every_variant_line_of_the_readme_resolves_on_its_recipe_to_the_named_functions():
    from rlmt_jax.settings.config import resolve

    lines = [line.split("  #")[0].split() for line in readme_variants_section().splitlines()
             if line.startswith("rlmt-jax train") and "--import" not in line]
    assert len(lines) == 8
    chosen = set()
    for words in lines:
        cfg = resolve(words[2], words[3:])
        assert cfg.algorithm.policy_loss in POLICY_LOSSES and cfg.algorithm.advantage in ADVANTAGES
        chosen |= {cfg.algorithm.policy_loss, cfg.algorithm.advantage, cfg.rollout.group_filter}
    assert chosen == {"ppo_clip", "grpo", "drgrpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "varied", None}


def test_the_readme_example_module_registers_a_loss_that_runs(tmp_path, clean_registries):
    import jax.numpy as jnp

    from rlmt_jax.algorithms import AlgorithmConfig, Normalizers

    section = readme_variants_section()
    code = section[section.index("```python\n") + 10:]
    (tmp_path / "my_variants.py").write_text(code[:code.index("```")])
    import_variants([str(tmp_path / "my_variants.py")], entry_points=False)
    lp = jnp.array([[0.0, -1.0, -2.0]])
    mask = jnp.array([[0, 1, 1]])
    loss, _ = POLICY_LOSSES("clipped_reinforce")(lp, lp - jnp.array([[0.0, 0.5, 0.0]]), jnp.array([2.0]), mask,
                                                 AlgorithmConfig(), normalizers=Normalizers.of(mask))
    # r = e^0.5 capped at 1.2 on token 1, r = 1 on token 2: -(1.2 * 2 * -1 + 1 * 2 * -2) / 2
    assert float(loss) == pytest.approx(3.2, rel=1e-6)
