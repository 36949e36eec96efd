"""Real tiny tokenizers for tests: Llama-3.1-Instruct style and Qwen2.5-Instruct style, built once per session.

Use from a test module with `from fixtures_tokenizers import llama_tokenizer, qwen_tokenizer, ...`
(pytest puts tests/ on sys.path), or list this module in conftest's `pytest_plugins`.
Directory fixtures are session-scoped; the tokenizer fixtures load a fresh copy per test, since
the zero template changes a tokenizer in place.
"""

from __future__ import annotations

import pytest

from rlmt_jax.inputs.toy_tokenizer import ToyTokenizerSpec, build_toy_tokenizer


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "llama3-instruct"
    build_toy_tokenizer(path, ToyTokenizerSpec(family="llama3"))
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "qwen2-instruct"
    build_toy_tokenizer(path, ToyTokenizerSpec(family="qwen2"))
    return path


@pytest.fixture(scope="session")
def llama_base_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "llama3-base"
    build_toy_tokenizer(path, ToyTokenizerSpec(family="llama3", variant="base"))
    return path


@pytest.fixture(scope="session")
def qwen_base_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "qwen2-base"
    build_toy_tokenizer(path, ToyTokenizerSpec(family="qwen2", variant="base"))
    return path


@pytest.fixture
def llama_tokenizer(llama_tokenizer_dir):
    return load_tokenizer(llama_tokenizer_dir)


@pytest.fixture
def qwen_tokenizer(qwen_tokenizer_dir):
    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture
def llama_base_tokenizer(llama_base_tokenizer_dir):
    return load_tokenizer(llama_base_tokenizer_dir)


@pytest.fixture
def qwen_base_tokenizer(qwen_base_tokenizer_dir):
    return load_tokenizer(qwen_base_tokenizer_dir)
