"""The package's layers (pyproject.toml's import-linter contracts) hold, and an upward import breaks them."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"


def lint(tree: Path) -> subprocess.CompletedProcess:
    """import-linter over the rlmt_jax and models packages of `tree`, with its pyproject.toml."""
    return subprocess.run([sys.executable, "-c", LINT], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("tree")
    for name in ("rlmt_jax", "models"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def plant(tree: Path, module: str, line: str) -> str:
    """Appends `line` inside a function of `module` (a path under tree); returns the original text."""
    path = tree / module
    text = path.read_text()
    path.write_text(text + f"\n\ndef _planted():\n    {line}\n")
    return text


def test_the_layer_contracts_hold_on_the_package():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    # a lower stage reaching up: the checkpoint code asking the trainer, settings asking the rollout
    ("rlmt_jax/run/checkpoint.py", "from rlmt_jax.trainer import train", "stages:"),
    ("rlmt_jax/settings/config.py", "from rlmt_jax.rollout.sampling import Sampler", "stages:"),
    # two stages of one layer are independent: the update stage may not import the sampler
    ("rlmt_jax/training/train_step.py", "from rlmt_jax.rollout import sampling", "stages:"),
    ("rlmt_jax/core/files.py", "import rlmt_jax.algorithms", "stages:"),
    ("models/layers.py", "from rlmt_jax.scale import mesh", "models:"),
    ("rlmt_jax/algorithms/common.py", "import models", "algorithms:"),
    # a cycle inside one stage
    ("rlmt_jax/algorithms/registry.py", "from rlmt_jax.algorithms import specs", "no cycles"),
])
def test_a_planted_import_breaks_the_contract_that_forbids_it(tree_copy, module, line, contract):
    original = plant(tree_copy, module, line)
    try:
        result = lint(tree_copy)
    finally:
        (tree_copy / module).write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [row for row in result.stdout.splitlines() if row.endswith(" BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
    if contract == "no cycles":  # inside one stage: no layer is crossed
        assert broken == [row for row in broken if row.startswith(contract)], result.stdout


def test_a_new_stage_package_must_be_placed_in_a_layer(tree_copy):
    (tree_copy / "rlmt_jax" / "engine").mkdir()
    (tree_copy / "rlmt_jax" / "engine" / "__init__.py").write_text("")
    try:
        result = lint(tree_copy)
    finally:
        shutil.rmtree(tree_copy / "rlmt_jax" / "engine")
    assert result.returncode == 1 and "rlmt_jax.engine" in result.stdout + result.stderr


def test_the_old_module_paths_still_import_with_a_deprecation_warning():
    from rlmt_jax.settings import config
    from rlmt_jax.training import train_step

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from rlmt_jax.config import resolve
        from rlmt_jax import train_step as old_train_step  # noqa: F401  (the attribute, once imported)
        import rlmt_jax.train_step as old
    assert resolve is config.resolve
    assert old.train_step is train_step.train_step
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert "rlmt_jax.config moved to rlmt_jax.settings.config; the old path goes away in rlmt-jax 0.2" in messages
