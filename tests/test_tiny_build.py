"""The built-in tiny models: every process of a multi-host run can build them, builders racing on one disk
are safe, and the build is the one `models.save_pretrained` would write (bit for bit, from fixed seeds)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clusters import simulated_devices
from flax import nnx
from safetensors.numpy import save_file
from transformers import AutoTokenizer

from models import build_model, save_pretrained
from models.hf_io import EXPORT_MARKER
from rlmt_jax.inputs import tiny

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def file_hashes(root: Path) -> dict[str, str]:
    """Every file's digest, but the export marker's: it names the writing process (pid, host)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != EXPORT_MARKER}


@pytest.fixture(scope="module")
def reference(tiny_cache) -> Path:
    """The tiny models built by this (single) test process, in the session's cache."""
    return tiny.tiny_assets_dir()


def test_the_tiny_models_are_the_files_save_pretrained_writes(reference, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(reference / "tokenizer")
    extra = sorted((reference / "tokenizer").iterdir())
    policy = build_model(tiny.tiny_model_config(tokenizer, "LlamaForCausalLM"), nnx.Rngs(tiny.POLICY_SEED))
    reward = build_model(tiny.tiny_model_config(tokenizer, "LlamaForSequenceClassification"),
                         nnx.Rngs(tiny.REWARD_SEED))
    reward.score.set_value(reward.score[...] * tiny.REWARD_HEAD_SCALE)
    save_pretrained(policy, tmp_path / "policy", extra_files=extra)
    save_pretrained(reward, tmp_path / "reward", extra_files=extra)
    for name in ("policy", "reward"):
        assert file_hashes(reference / name) == file_hashes(tmp_path / name), name
    assert sorted(file_hashes(reference)) == [
        "policy/chat_template.jinja", "policy/config.json", "policy/generation_config.json",
        "policy/model.safetensors", "policy/tokenizer.json", "policy/tokenizer_config.json",
        "reward/chat_template.jinja", "reward/config.json", "reward/model.safetensors", "reward/tokenizer.json",
        "reward/tokenizer_config.json",
        "tokenizer/chat_template.jinja", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    assert (reference / "policy" / EXPORT_MARKER).is_file() and (reference / "reward" / EXPORT_MARKER).is_file()


FAKE_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
               "num_hidden_layers": 1, "num_attention_heads": 1}


def fake_build(label: str, seen: list[bool]):
    """A quick stand-in for tiny._build that records whether the cache folder existed while it ran; its files
    are readable (labelled in tokenizer_config.json) but hold no real model."""

    def build(folder: Path) -> None:
        seen.append((tiny.cache_root() / f"tiny-{tiny.VERSION}").exists())
        for part in ("tokenizer", "policy", "reward"):
            (folder / part).mkdir()
            (folder / part / "tokenizer.json").write_text("{}")
            (folder / part / "tokenizer_config.json").write_text(json.dumps({"label": label}))
            if part != "tokenizer":
                (folder / part / "config.json").write_text(json.dumps(FAKE_CONFIG))
                save_file({"x": np.zeros(2, np.float32)}, folder / part / "model.safetensors")

    return build


def label(root: Path, part: str) -> str:
    return json.loads((root / part / "tokenizer_config.json").read_text())["label"]


def test_a_build_appears_in_the_cache_only_when_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMT_JAX_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(tiny, "_build", fake_build("mine", seen))
    root = tiny.tiny_assets_dir()
    assert seen == [False]  # written elsewhere (a temporary folder beside it), then renamed
    assert label(root, "policy") == "mine"
    assert os.listdir(tmp_path) == [f"tiny-{tiny.VERSION}"]  # the temporary folder is gone
    assert tiny.tiny_assets_dir() == root and seen == [False]  # made once


def test_a_builder_that_loses_the_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMT_JAX_CACHE", str(tmp_path))
    seen = []
    theirs = fake_build("theirs", seen)

    def build_while_another_process_finishes_first(folder: Path) -> None:
        winner = tmp_path / "winner"
        winner.mkdir()
        theirs(winner)
        os.rename(winner, tmp_path / f"tiny-{tiny.VERSION}")
        fake_build("mine", seen)(folder)

    monkeypatch.setattr(tiny, "_build", build_while_another_process_finishes_first)
    root = tiny.tiny_assets_dir()
    assert seen == [False, True]
    assert [label(root, p) for p in ("tokenizer", "policy", "reward")] == ["theirs"] * 3
    assert os.listdir(tmp_path) == [f"tiny-{tiny.VERSION}"]


@pytest.mark.parametrize("damage", ["incomplete", "truncated", "garbage", "config without a key"])
def test_a_damaged_cache_folder_is_built_again(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("RLMT_JAX_CACHE", str(tmp_path))
    old = tmp_path / f"tiny-{tiny.VERSION}"
    old.mkdir()
    fake_build("old", [])(old)
    weights = old / "reward" / "model.safetensors"
    if damage == "incomplete":
        shutil.rmtree(old / "policy")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-3])
    elif damage == "garbage":
        weights.write_bytes(b"not safetensors at all" * 4)
    else:
        (old / "policy" / "config.json").write_text(json.dumps({**FAKE_CONFIG, "hidden_size": None}))
    assert tiny.damage(old) is not None
    seen = []
    monkeypatch.setattr(tiny, "_build", fake_build("new", seen))
    root = tiny.tiny_assets_dir()
    assert seen == [False] and root == old  # set aside before the build, which took its place
    assert [label(root, p) for p in ("tokenizer", "policy", "reward")] == ["new"] * 3
    assert tiny.damage(root) is None
    assert os.listdir(tmp_path) == [f"tiny-{tiny.VERSION}"]


def test_two_processes_building_at_once_get_the_same_complete_models(reference, tmp_path):
    """Two JAX processes of one cluster (1 CPU device each; process 1 owns no device of process 0) build into
    one fresh cache at the same time; both end with the reference build, and no temporary folder is left."""
    cache = tmp_path / "cache"
    env = dict(simulated_devices(1), RLMT_JAX_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workers = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "multihost_worker.py"),
         json.dumps({"process_id": i, "num_processes": 2, "port": port, "build_tiny": True})],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    summaries = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=TIMEOUT_S)
            assert worker.returncode == 0, err[-4000:]
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert [(s["process_index"], s["process_count"]) for s in summaries] == [(0, 2), (1, 2)]
    assert [s["cache_existed"] for s in summaries] == [False, False]  # both built
    expected = file_hashes(reference)
    assert [s["files"] for s in summaries] == [expected, expected]
    assert file_hashes(cache / f"tiny-{tiny.VERSION}") == expected
    assert os.listdir(cache) == [f"tiny-{tiny.VERSION}"]
