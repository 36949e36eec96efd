"""The tiny built-in models of the default run: a Llama-style policy and reward model made from a fixed seed.

`builtin:tiny-policy` and `builtin:tiny-reward` in a config resolve to Hugging Face directories that are made
once and cached (in $RLMT_JAX_CACHE, default ~/.cache/rlmt_jax). Both share a small byte-level BPE tokenizer
with the Llama-3.1-Instruct special tokens and chat template, and the think tags as single tokens (a random
tiny model could never spell `</think>` out of several pieces, so learning the format would take too long).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
from flax import nnx

from models import ModelConfig, build_model, save_pretrained
from rlmt_jax.config import BUILTIN_PREFIX, BUILTIN_DATA
from rlmt_jax.errors import UserError

VERSION = "v1"  # bump when the recipe below changes, so caches are rebuilt
POLICY_SEED, REWARD_SEED = 0, 1
# Reward scores of a random head are tiny; this scale gives them a spread near 1 so preferences are visible.
REWARD_HEAD_SCALE = 25.0


def cache_root() -> Path:
    return Path(os.environ.get("RLMT_JAX_CACHE", Path.home() / ".cache" / "rlmt_jax"))


def _prompt_lines() -> tuple[str, ...]:
    from importlib import resources

    text = resources.files("rlmt_jax").joinpath("resources", BUILTIN_DATA["tiny-prompts"]).read_text("utf-8")
    return tuple(json.loads(line)["messages"][0]["content"] for line in text.splitlines() if line.strip())


def _tokenizer_spec():
    from rlmt_jax.toy_tokenizer import DEFAULT_LINES, ToyTokenizerSpec

    return ToyTokenizerSpec(family="llama3", variant="instruct", vocab_size=768, think_tags="added",
                            lines=DEFAULT_LINES + _prompt_lines())


def tiny_model_config(tokenizer, architecture: str) -> ModelConfig:
    vocab = -(-len(tokenizer) // 64) * 64
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")),
        pad_token_id=tokenizer.pad_token_id,
    )


def _build(root: Path) -> None:
    from rlmt_jax.toy_tokenizer import build_toy_tokenizer

    tokenizer_dir = root / "tokenizer"
    tokenizer = build_toy_tokenizer(tokenizer_dir, _tokenizer_spec())
    tokenizer_files = [tokenizer_dir / name for name in os.listdir(tokenizer_dir)]

    policy = build_model(tiny_model_config(tokenizer, "LlamaForCausalLM"), nnx.Rngs(POLICY_SEED))
    save_pretrained(policy, root / "policy", extra_files=tokenizer_files)

    reward = build_model(tiny_model_config(tokenizer, "LlamaForSequenceClassification"), nnx.Rngs(REWARD_SEED))
    reward.score.set_value(reward.score[...] * REWARD_HEAD_SCALE)
    save_pretrained(reward, root / "reward", extra_files=tokenizer_files)


def tiny_assets_dir() -> Path:
    """The cached folder with `policy/` and `reward/` (made on first use, atomically)."""
    root = cache_root() / f"tiny-{VERSION}"
    if (root / "policy" / "config.json").exists() and (root / "reward" / "config.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{VERSION}.tmp-", dir=root.parent))
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            _build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_model_path(path: str | None) -> str | None:
    """A model path from a config: `builtin:tiny-policy` / `builtin:tiny-reward` become cached directories."""
    if path is None or not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    folders = {"tiny-policy": "policy", "tiny-reward": "reward"}
    if name not in folders:
        raise UserError(f"unknown built-in model {path!r}; built-in models: "
                        + ", ".join(BUILTIN_PREFIX + n for n in folders))
    return str(tiny_assets_dir() / folders[name])
