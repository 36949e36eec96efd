"""The CLI keeps compiled programs in JAX's persistent cache under $RLMT_JAX_CACHE/xla, so a program compiled
by one process is loaded, not compiled, by the next; JAX's own settings move it or turn it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A program that takes about a second to compile (well above MIN_COMPILE_SECONDS = 0.2 s: 400 ops took 0.21 s on an
# idle 2-core machine and were sometimes not cached), compiled after
# enable_compilation_cache(); prints the cache folder and how many programs were loaded from the cache.
SCRIPT = """
import json, jax, jax.numpy as jnp
from jax._src import monitoring
from rlmt_jax.scale.compile_cache import enable_compilation_cache

hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
path = enable_compilation_cache()

def chain(x):
    for i in range(1500):
        x = jnp.sin(x) * 1.0001 + i
    return x

jax.jit(chain)(jnp.ones(3)).block_until_ready()
print(json.dumps({"path": str(path) if path else None, "hits": len(hits)}))
"""


def run(cache_root: Path, stderr: list | None = None, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                                                                    "JAX_ENABLE_COMPILATION_CACHE"))}
    env.update(RLMT_JAX_CACHE=str(cache_root), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if stderr is not None:
        stderr.append(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("jit_chain")) if folder.is_dir() else []


def test_a_program_compiled_once_is_loaded_by_the_next_process(tmp_path):
    first = run(tmp_path)
    assert first == {"path": str(tmp_path / "xla"), "hits": 0}
    assert len(entries(tmp_path / "xla")) == 1
    assert run(tmp_path) == first | {"hits": 1}  # the second process loads it


def test_jax_settings_move_the_cache_or_turn_it_off(tmp_path):
    assert run(tmp_path / "off", JAX_ENABLE_COMPILATION_CACHE="false") == {"path": None, "hits": 0}
    assert not (tmp_path / "off" / "xla").exists()
    moved = tmp_path / "elsewhere"
    assert run(tmp_path / "root", JAX_COMPILATION_CACHE_DIR=str(moved))["path"] == str(moved)
    assert len(entries(moved)) == 1 and not (tmp_path / "root" / "xla").exists()


def test_a_cache_folder_that_cannot_be_made_is_one_warning_and_no_cache(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    stderr = []
    assert run(not_a_folder, stderr) == {"path": None, "hits": 0}
    assert stderr[0].count("compiled programs are not cached: cannot make") == 1
    assert "persistent compilation cache" not in stderr[0]  # no warning from JAX at each compile
