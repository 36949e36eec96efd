"""The tiny built-in models of the default run: a Llama-style policy and reward model made from a fixed seed.

`builtin:tiny-policy` and `builtin:tiny-reward` in a config resolve to Hugging Face directories that are made
once and cached (in $RLMT_JAX_CACHE, default ~/.cache/rlmt_jax). Every process of a multi-host run can make
them by itself, on its own CPU device, and several processes may make them at once on one disk: each builds
into a temporary folder beside the cache and renames it into place; the first rename wins, the others keep
the winner's folder, so a reader never sees a half-written one. A cache found damaged (a file missing, cut
short or overwritten) is set aside and built again. Both share a small byte-level BPE tokenizer with the
Llama-3.1-Instruct special tokens and chat template, and the think tags as single tokens (a random tiny model
could never spell `</think>` out of several pieces, so learning the format would take too long).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
from flax import nnx

from models import ModelConfig, build_model, save_pretrained
from models.hf_io import process_umask
from rlmt_jax.settings.config import BUILTIN_PREFIX, BUILTIN_DATA
from rlmt_jax.core.cache import cache_root
from rlmt_jax.core.errors import UserError

log = logging.getLogger("rlmt_jax.inputs.tiny")
VERSION = "v1"  # bump when the recipe below changes, so caches are rebuilt
POLICY_SEED, REWARD_SEED = 0, 1
# Reward scores of a random head are tiny; this scale gives them a spread near 1 so preferences are visible.
REWARD_HEAD_SCALE = 25.0


def _prompt_lines() -> tuple[str, ...]:
    from importlib import resources

    text = resources.files("rlmt_jax").joinpath("resources", BUILTIN_DATA["tiny-prompts"]).read_text("utf-8")
    return tuple(json.loads(line)["messages"][0]["content"] for line in text.splitlines() if line.strip())


def _tokenizer_spec():
    from rlmt_jax.inputs.toy_tokenizer import DEFAULT_LINES, ToyTokenizerSpec

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
    from rlmt_jax.inputs.toy_tokenizer import build_toy_tokenizer

    tokenizer_dir = root / "tokenizer"
    tokenizer = build_toy_tokenizer(tokenizer_dir, _tokenizer_spec())
    tokenizer_files = sorted(tokenizer_dir.iterdir())

    policy = build_model(tiny_model_config(tokenizer, "LlamaForCausalLM"), nnx.Rngs(POLICY_SEED))
    # every process writes its own copy (save_pretrained writes on process 0 only by default)
    save_pretrained(policy, root / "policy", extra_files=tokenizer_files, writer=True)

    reward = build_model(tiny_model_config(tokenizer, "LlamaForSequenceClassification"), nnx.Rngs(REWARD_SEED))
    reward.score.set_value(reward.score[...] * REWARD_HEAD_SCALE)
    save_pretrained(reward, root / "reward", extra_files=tokenizer_files, writer=True)


def damage(root: Path) -> str | None:
    """What is wrong with a cached build (a missing, truncated or garbage file), or None when it is whole."""
    from models import ModelConfig, SafetensorsReader

    for part in ("tokenizer", "policy", "reward"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            try:
                json.loads((root / part / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                return f"{root / part / name}: {err}"
        if part == "tokenizer":
            continue
        try:
            ModelConfig.from_pretrained(root / part)
            SafetensorsReader(root / part).close()  # reads the headers: a short or garbage file fails
        except (OSError, ValueError) as err:
            return str(err)
    return None


def _build_device() -> jax.Device:
    """This process's own CPU device (jax.devices('cpu')[0] is process 0's in a multi-host run); the
    accelerator where the CPU backend is switched off (random init may then differ in the last bits)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def tiny_assets_dir() -> Path:
    """The cached folder with `tokenizer/`, `policy/` and `reward/`, made on first use by this process."""
    root = cache_root() / f"tiny-{VERSION}"
    if root.exists():
        problem = damage(root)
        if problem is None:
            return root
        log.warning("the built-in tiny models' cache %s is damaged (%s): building it again", root, problem)
        _set_aside(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{VERSION}.tmp-", dir=root.parent))
    tmp.chmod(0o777 & ~process_umask())  # mkdtemp's 0700 would keep a shared cache from the others
    try:
        with jax.default_device(_build_device()):
            _build(tmp)
        try:
            os.rename(tmp, root)  # atomic; fails when `root` exists and is not empty
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # another process renamed its build into place first: keep theirs (the same bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if (problem := damage(root)) is not None:  # another process's damaged build won the rename
        raise UserError(f"the built-in tiny models' cache {root} is damaged ({problem}); delete it and run again")
    return root


def _set_aside(root: Path) -> None:
    """Moves a damaged cache folder out of the way and deletes it (another process may have done so first)."""
    aside = Path(tempfile.mkdtemp(prefix=f".tiny-{VERSION}.damaged-", dir=root.parent))
    try:
        os.rename(root, aside / "old")
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)


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
