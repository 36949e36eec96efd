"""Hugging Face directories in and out: round trips through transformers, config layouts, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import models
from models.config import ConfigError, ModelConfig
from tests.hf_factory import PAD_ID, make_checkpoint

LLAMA31_HF4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "attention_bias": False, "mlp_bias": False,
}


def test_llama31_config_reads_the_same_in_transformers4_and_transformers5_layouts():
    old = ModelConfig.from_hf_config(LLAMA31_HF4)
    new_layout = {k: v for k, v in LLAMA31_HF4.items() if k not in ("rope_theta", "rope_scaling")}
    new_layout["rope_parameters"] = {**LLAMA31_HF4["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf_config(new_layout) == old
    assert old.head_dim == 128 and old.num_key_value_heads == 8 and old.eos_token_id == (128001, 128008, 128009)
    assert old.rope_scaling == models.RopeScaling(8.0, 1.0, 4.0, 8192)
    for major in (4, 5):
        assert ModelConfig.from_hf_config(old.to_hf_config(transformers_major=major)) == old
    assert "rope_parameters" in old.to_hf_config(transformers_major=5)
    assert old.to_hf_config(transformers_major=4)["rope_scaling"]["rope_type"] == "llama3"


def test_written_config_is_read_by_installed_transformers():
    cfg = ModelConfig.from_hf_config(LLAMA31_HF4)
    hf = transformers.LlamaConfig(**cfg.to_hf_config())
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
    assert hf.num_key_value_heads == 8 and hf.head_dim == 128


def test_qwen2_always_has_qkv_bias_and_no_output_bias():
    cfg = ModelConfig.from_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 131072, "tie_word_embeddings": False,
    })
    assert cfg.qkv_bias and not cfg.o_bias and cfg.head_dim == 128 and cfg.rope_scaling is None


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
])
def test_unsupported_config_is_an_error_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf_config({**LLAMA31_HF4, **change})


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name, scan_layers, shard", [
    ("llama31", False, "5GB"), ("qwen25_tied", True, 20_000), ("llama32_tied", False, 30_000),
])
def test_save_pretrained_round_trip_loads_in_transformers_with_equal_logits(tmp_path, name, scan_layers, shard):
    path, reference = make_checkpoint(tmp_path / "src", name)
    model = models.load_pretrained(path, scan_layers=scan_layers)
    out = models.save_pretrained(model, tmp_path / "export", max_shard_size=shard)
    files = sorted(os.listdir(out))
    if shard == "5GB":
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
        assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert "generation_config.json" in files
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # no leftover temporary folder
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(4, 150, size=(2, 24))
    np.testing.assert_allclose(logits_of(reloaded, ids), logits_of(reference, ids), atol=1e-5)
    np.testing.assert_allclose(np.asarray(models.load_pretrained(out)(jnp.asarray(ids, jnp.int32))),
                               logits_of(reference, ids), atol=1e-4)


def test_reward_model_round_trip_through_transformers(tmp_path):
    path, reference = make_checkpoint(tmp_path / "rm", "qwen25", task="seq_cls")
    out = models.save_pretrained(models.load_pretrained(path), tmp_path / "rm_out")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.pad_token_id == PAD_ID
    ids = torch.tensor(np.random.default_rng(1).integers(4, 150, size=(2, 10)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(input_ids=ids).logits.numpy(), reference(input_ids=ids).logits.numpy(),
                                   atol=1e-5)


def test_save_pretrained_bfloat16_export(tmp_path):
    path, _ = make_checkpoint(tmp_path / "src", "llama3")
    out = models.save_pretrained(models.load_pretrained(path), tmp_path / "bf16", dtype="bfloat16")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    reloaded = models.load_pretrained(out, param_dtype="bfloat16")
    assert reloaded.model.embed[...].dtype == jnp.bfloat16


def test_save_pretrained_replaces_an_earlier_export_but_not_one_with_files_added(tmp_path):
    from models.hf_io import DestinationError

    path, _ = make_checkpoint(tmp_path / "src", "llama3")
    model = models.load_pretrained(path)
    target = tmp_path / "export"
    models.save_pretrained(model, target)
    models.save_pretrained(model, target)  # an earlier export of ours: replaced, nothing left beside it
    assert sorted(os.listdir(tmp_path)) == ["export", "src"]
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="notes.txt"):
        models.save_pretrained(model, target)
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["export", "src"]


@pytest.mark.parametrize("fails", ["safetensors", "config"])
def test_an_export_that_cannot_be_written_is_a_destination_error_naming_it_and_leaves_nothing(tmp_path, monkeypatch,
                                                                                              fails):
    """A full disk: safetensors' SafetensorError (a 24-line traceback; exit 1 at the end of a run, the status for
    a non-finite stop) or an OSError without a path. A DestinationError is what the trainer's final export and
    the export and convert commands turn into one line."""
    import errno

    from models import hf_io

    path, _ = make_checkpoint(tmp_path / "src", "llama3")
    model = models.load_pretrained(path)
    if fails == "safetensors":
        def full_disk(*args, **kwargs):
            raise hf_io.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(hf_io, "save_file", full_disk)
    else:
        real_open = open

        def full_disk(file, mode="r", *args, **kwargs):
            if str(file).endswith("config.json") and "w" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", full_disk)
    out = tmp_path / "out" / "export"
    with pytest.raises(hf_io.ExportWriteError) as err:
        models.save_pretrained(model, out)
    assert isinstance(err.value, models.DestinationError)
    assert str(err.value) == f"{out}: cannot write the export (No space left on device); nothing was written"
    assert os.listdir(tmp_path / "out") == []


def test_a_destination_under_a_file_or_that_is_a_symlink_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    with pytest.raises(models.DestinationError, match=f"^{tmp_path / 'notes.txt' / 'a' / 'b'}: "
                                                      f"{tmp_path / 'notes.txt'} is a file, not a folder"):
        models.check_destination(tmp_path / "notes.txt" / "a" / "b")
    with pytest.raises(models.DestinationError, match=f"^{tmp_path / 'link'} is a symbolic link"):
        models.check_destination(tmp_path / "link")
    models.check_destination(tmp_path / "folder" / "new")  # a new folder in a folder: fine


def _convert(tmp_path, capsys, source, out) -> tuple[int, list[str]]:
    from rlmt_jax.cli import main

    capsys.readouterr()
    code = main(["convert", str(source), "--out", str(out)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_convert_onto_a_folder_of_files_under_a_file_or_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """Each was a DestinationError, FileExistsError or SafetensorError traceback."""
    from models import hf_io

    path, _ = make_checkpoint(tmp_path / "src", "llama3")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, lines = _convert(tmp_path, capsys, path, mine)
    assert code == 2 and lines == [f"rlmt-jax convert: error: --out {mine} already holds files that are not an "
                                   "rlmt-jax export (thesis.tex); export into a new folder (nothing was written)"]
    code, lines = _convert(tmp_path, capsys, path, mine / "thesis.tex" / "out")
    assert code == 2 and lines == [f"rlmt-jax convert: error: --out {mine / 'thesis.tex' / 'out'}: "
                                   f"{mine / 'thesis.tex'} is a file, not a folder; export into a new folder"]

    def full_disk(*args, **kwargs):
        raise hf_io.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf_io, "save_file", full_disk)
    code, lines = _convert(tmp_path, capsys, path, tmp_path / "out")
    assert code == 2 and lines == [f"rlmt-jax convert: error: --out {tmp_path / 'out'}: cannot write the export "
                                   "(No space left on device); nothing was written"]
    assert sorted(os.listdir(tmp_path)) == ["mine", "src"] and os.listdir(mine) == ["thesis.tex"]


def test_convert_takes_a_builtin_model_by_name(tiny_cache, tmp_path, capsys):
    code, lines = _convert(tmp_path, capsys, "builtin:tiny-reward", tmp_path / "rm")
    assert code == 0, lines
    assert isinstance(models.load_pretrained(tmp_path / "rm"), models.RewardModel)
    assert (tmp_path / "rm" / "tokenizer.json").is_file()


def test_value_model_starts_from_the_policy_decoder(tmp_path):
    path, _ = make_checkpoint(tmp_path / "src", "llama3")
    policy = models.load_pretrained(path)
    critic = models.load_pretrained(path, task="value")
    assert isinstance(critic, models.ValueModel)
    np.testing.assert_array_equal(np.asarray(critic.model.embed[...]), np.asarray(policy.model.embed[...]))
    ids = jnp.asarray(np.random.default_rng(2).integers(4, 150, size=(2, 7)), jnp.int32)
    np.testing.assert_allclose(np.asarray(critic.hidden_states(ids)), np.asarray(policy.hidden_states(ids)),
                               atol=1e-6)
    critic.value_bias[...] = jnp.array([0.25])
    head = np.asarray(critic.value_head[...])[:, 0]
    expected = np.asarray(policy.hidden_states(ids)) @ head + 0.25  # one value per token, from its own position
    np.testing.assert_allclose(np.asarray(critic(ids)), expected, atol=1e-5)


def test_critic_head_is_the_seeded_fresh_head_and_no_random_decoder_is_made():
    from models.transformer import _VALUE_HEAD

    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    policy = models.CausalLM(cfg, rngs=nnx.Rngs(1))
    critic = models.value_model_from(policy, nnx.Rngs(7))
    fresh = models.ValueModel(cfg, nnx.Rngs(7))
    np.testing.assert_allclose(np.asarray(critic.value_head[...]), np.asarray(fresh.value_head[...]), atol=1e-7)
    assert np.all(np.asarray(critic.value_bias[...]) == 0)
    for ours, theirs in zip(jax.tree.leaves(nnx.state(critic.model)), jax.tree.leaves(nnx.state(policy.model))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # the head's constructor keeps nothing of the decoder's random init: its scratch memory is a few KB, where
    # this config's decoder is ~16 MB (and an 8B one 32 GB)
    big = cfg.replace(vocab_size=4096, hidden_size=256, intermediate_size=1024)
    head_only = nnx.jit(lambda r: nnx.state(models.ValueModel(big, r), _VALUE_HEAD)).lower(nnx.Rngs(7)).compile()
    assert head_only.memory_analysis().temp_size_in_bytes < 64 * 1024


def _rewrite_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(models.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: missing"):
        models.load_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    _rewrite_tensors(path, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros((2,), np.float32)))
    with pytest.raises(models.CheckpointError, match=r"unexpected tensors .*model\.layers\.0\.extra\.weight"):
        models.load_pretrained(path)


def test_misshaped_tensor_names_both_shapes(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    _rewrite_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                   np.zeros((16, 64), np.float32)))
    with pytest.raises(models.CheckpointError,
                       match=r"k_proj\.weight: shape \(16, 64\) in the checkpoint, but the config expects \(32, 64\)"):
        models.load_pretrained(path)


def test_pickle_weights_are_refused_with_a_hint(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickle .bin weights are never loaded"):
        models.load_pretrained(path)


def test_missing_directory_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        models.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_pretrained(tmp_path / "empty")


def test_load_pretrained_takes_jax_and_numpy_dtypes_as_well_as_names(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    model = models.load_pretrained(path, dtype=jnp.bfloat16, param_dtype=np.float32)
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "float32"
    assert model.model.embed[...].dtype == jnp.float32
    by_name = models.load_pretrained(path, dtype="bfloat16", param_dtype=jnp.bfloat16)
    assert by_name.model.embed[...].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype: 'nonsense' is not a dtype"):
        models.load_pretrained(path, dtype="nonsense")


def _one_line_cli_error(tmp_path, capsys, model_dir) -> str:
    """`rlmt-jax generate --model model_dir`: exit status 2 and the one line it prints."""
    from rlmt_jax.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "hi"}) + "\n")
    capsys.readouterr()  # transformers' progress bars from making the checkpoint
    code = main(["generate", "--model", str(model_dir), "--input", str(prompts), "--output", str(tmp_path / "o.json")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert not (tmp_path / "o.json").exists()
    return lines[0]


def test_a_config_without_a_required_key_names_the_key_and_the_file(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    config = os.path.join(path, "config.json")
    with open(config) as f:
        hf = json.load(f)
    del hf["hidden_size"]
    with open(config, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ConfigError, match=f"{config}: hidden_size: missing, and LlamaForCausalLM needs it"):
        models.load_pretrained(path)
    assert f"{config}: hidden_size: missing" in _one_line_cli_error(tmp_path, capsys, path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_garbage_safetensors_file_is_named(tmp_path, capsys, damage):
    path, _ = make_checkpoint(tmp_path / "m", "llama3")
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(models.CheckpointError, match=f"{file}: not a readable safetensors file"):
        models.load_pretrained(path)
    assert f"{file}: not a readable safetensors file" in _one_line_cli_error(tmp_path, capsys, path)
