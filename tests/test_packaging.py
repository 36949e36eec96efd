"""What `pip install -e .` brings: every runtime dependency declared (no torch), Python >= 3.11, the extras; and
.ci/run runs the README's two quick-start commands (the first in a virtualenv with nothing else)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> list[str]:
    return [re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]*\])?", r).group(0).lower() for r in requirements]


def test_runtime_dependencies_include_jinja2_and_not_torch():
    # transformers renders chat templates with jinja2 but does not require it; torch brought it in before
    deps = names(PROJECT["dependencies"])
    assert "jinja2" in deps
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "grain", "safetensors",
            "pyyaml", "tensorboardx", "numpy"} <= set(deps)
    assert "torch" not in deps


def test_requires_python_311_as_jax_does():
    assert PROJECT["requires-python"] == ">=3.11"


def test_extras_torch_only_for_tests_and_pinned_wandb_and_plot_on_request():
    extras = PROJECT["optional-dependencies"]
    assert [r for r in extras["test"] if r.startswith("torch")] == ["torch==2.13.0"]
    assert all("torch" not in names(reqs) for name, reqs in extras.items() if name != "test")
    assert names(extras["wandb"]) == ["wandb"] and names(extras["plot"]) == ["matplotlib"]
    # the accelerator extras add jax's plugins on top of every base dependency, jinja2 included
    assert (names(extras["tpu"]), names(extras["gpu"])) == (["jax[tpu]"], ["jax[cuda12]"])


def test_ci_runs_the_readme_quick_start_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "pip install -e . && rlmt-jax train\n" in readme
    assert "pip install -e '.[test]' && python -m pytest -q\n" in readme
    # the first in a fresh virtualenv with nothing but the package, in an empty folder
    assert 'python -m venv "$smoke/venv"' in ci
    assert '"$smoke/venv/bin/python" -m pip install -q -e "$repo"' in ci
    assert '"$smoke/venv/bin/rlmt-jax" train run.total_steps=2' in ci
    # the second exactly as the README has it
    assert "\npython -m pip install -q -e '.[test]'\npython -m pytest -q\n" in ci
