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

import pytest  # noqa: E402


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
