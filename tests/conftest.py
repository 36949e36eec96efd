import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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
