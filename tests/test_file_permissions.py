"""Files and folders rlmt-jax writes get the process umask's permissions, as any file the user makes does:
0644 / 0755 under umask 022 (a colleague can read them), 0600 / 0700 under umask 077 (they stay private)."""

import contextlib
import os
import stat

import pytest
from flax import nnx

import models
from models.hf_io import process_umask
from rlmt_jax.settings.config import resolve, save_resolved
from rlmt_jax.core.files import atomic_write
from rlmt_jax.core.jsonl import write_jsonl_atomic
from rlmt_jax.run.metrics import truncate_jsonl

MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o027: (0o640, 0o750)}


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", sorted(MODES))
def test_process_umask_reads_the_mask_without_changing_it(mask):
    with umask(mask):
        assert process_umask() == mask
        assert process_umask() == mask


@pytest.mark.parametrize("mask", sorted(MODES))
def test_atomic_text_files_get_the_umask_modes(tmp_path, mask):
    file_mode, _ = MODES[mask]
    with umask(mask):
        with atomic_write(tmp_path / "a.txt") as f:
            f.write("x")
        write_jsonl_atomic(tmp_path / "rows.jsonl", [{"step": 1}, {"step": 2}])
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
        os.chmod(tmp_path / "metrics.jsonl", 0o600)  # rewritten below: the new file gets the umask's mode
        assert truncate_jsonl(tmp_path / "metrics.jsonl", next_step=2) == 1
        config = save_resolved(resolve(None, []), tmp_path / "run")
    assert (tmp_path / "a.txt").read_text() == "x"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    for path in ("a.txt", "rows.jsonl", "metrics.jsonl", config):
        assert mode(tmp_path / path) == file_mode, path
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "metrics.jsonl", "rows.jsonl", "run"]  # no temporaries left


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.yaml"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_save_pretrained_folder_and_files_get_the_umask_modes(tmp_path, mask):
    file_mode, dir_mode = MODES[mask]
    cfg = models.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    extra.chmod(0o600)
    with umask(mask):
        out = models.save_pretrained(models.CausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "export",
                                     extra_files=[extra], writer=True)
    assert mode(out) == dir_mode
    names = sorted(os.listdir(out))
    # .rlmt-jax-export: the marker that lets a later export replace this folder (and nothing else)
    assert names == [".rlmt-jax-export", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json"]
    assert {name: mode(os.path.join(out, name)) for name in names} == dict.fromkeys(names, file_mode)


def test_a_disk_error_without_a_file_name_names_the_file_and_leaves_no_temp_file(tmp_path):
    import errno

    target = tmp_path / "config.yaml"
    with pytest.raises(OSError) as caught, atomic_write(target):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk raises on write or close
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert str(caught.value) == f"[Errno 28] No space left on device: '{target}'"
    assert list(tmp_path.iterdir()) == []
