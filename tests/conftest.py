import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session, shared by the processes tests start (rlmt_jax/scale/compile_cache.py):
# many tests compile the same tiny programs, and a cached one loads in milliseconds.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlmt-jax-tests-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
    _SESSION_XLA_CACHE = None

# XLA:CPU's backend at LLVM -O0 for the session and the processes tests start (tests/clusters.py keeps it):
# the tests spend most of their time compiling tiny programs, which this makes ~25% faster, and none runs long
# enough for the slower code to matter. Results agree with -O2 to rounding (the same fusions, plainer code).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import pytest  # noqa: E402

# Test files that start processes or compile the most, first: the xdist workers (pyproject addopts) then end
# on short files instead of one waiting for the other's cluster to finish.
HEAVY_FILES = ("test_multihost.py", "test_rollout_layout.py", "test_slot_engine_mesh.py", "test_sharded_equality.py",
               "test_split_placement.py", "test_cli.py", "test_seams_trainer.py", "test_attention_kernels.py",
               "test_trainer.py", "test_reliability.py", "test_generate_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order kept


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_XLA_CACHE:
        shutil.rmtree(_SESSION_XLA_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """After each test module, JAX's compiled programs are dropped (jax.clear_caches). Each program keeps a few
    memory mappings for its code, and a session of ~1,300 tests compiles enough of them to reach the kernel's
    limit (vm.max_map_count, 65530): a program loaded after that crashes the process (SIGSEGV). A later module
    that needs a program again loads it from the session's persistent cache."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A fresh cache for the built-in tiny models (made once per test session)."""
    cache = tmp_path_factory.mktemp("rlmt_cache")
    old = os.environ.get("RLMT_JAX_CACHE")
    os.environ["RLMT_JAX_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("RLMT_JAX_CACHE", None)
    else:
        os.environ["RLMT_JAX_CACHE"] = old
