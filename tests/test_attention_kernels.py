"""The attention kernels (models/attention.py) against today's xla path, float32, on tiny Llama and Qwen checkpoints.

On CPU the kernels run as they are tested anywhere without the chip: splash in Pallas interpret mode, the cuDNN
route (its row rotation, lengths and layout) through jax.nn.dot_product_attention's XLA implementation. Every
batch holds a left-padded row, a right-padded row, a row padded on both sides and a full row; the checkpoints
have GQA (2:1 and Qwen's 7:1 with qkv bias). Values are compared on real tokens only: a pad query's output is
read by nothing real (and differs between implementations by design).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import attention as attention_lib
from models.attention import resolve_attention
from models.config import ConfigError, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("cudnn", "splash")
SEQ = 12
# (left pads, right pads) per row
PADDING = ((3, 0), (0, 4), (2, 3), (0, 0))
TOLERANCE = 1e-5


def padded_batch(seed: int = 0):
    """ids, mask, positions [4, SEQ] (positions = cumsum(mask) - 1, as the sampler's), rows as PADDING says."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 150, size=(len(PADDING), SEQ)).astype(np.int32)
    mask = np.ones((len(PADDING), SEQ), np.int32)
    for row, (left, right) in enumerate(PADDING):
        mask[row, :left] = 0
        mask[row, SEQ - right:] = 0
    ids = np.where(mask == 1, ids, 159)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    return ids, mask, positions


def load(path, implementation: str, **kwargs):
    """The checkpoint at `path` with `implementation`, layers scanned (one layer's program to compile)."""
    return models.load_pretrained(path, attention=implementation, scan_layers=True, **kwargs)


def forward_and_gradients(model, ids, mask, positions) -> dict[str, np.ndarray]:
    """Logits and next-token log-probs at real positions, and every param's gradient of a loss over the
    real positions' log-probs."""
    graphdef, params = nnx.split(model, nnx.Param)
    real = jnp.asarray(mask, bool)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*ids.shape, model.config.vocab_size)),
                          jnp.float32) * real[..., None]

    def outputs(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_logprobs = jnp.take_along_axis(logprobs[:, :-1], jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(weights * logprobs), (logits, token_logprobs)

    grads, (logits, token_logprobs) = jax.jit(jax.grad(outputs, has_aux=True))(params)
    out = {"logits": np.asarray(logits)[mask == 1],
           "token_logprobs": np.asarray(token_logprobs)[(mask[:, :-1] == 1) & (mask[:, 1:] == 1)]}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        out["grad " + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def jitted(model):
    """model(...) as one jitted program (eager calls would compile every op on its own)."""
    graphdef, state = nnx.split(model)
    return functools.partial(jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)), state)


def largest_difference(ours: dict, reference: dict) -> tuple[str, float]:
    """The key whose arrays differ most (absolute, relative to the reference's largest magnitude when > 1)."""
    assert sorted(ours) == sorted(reference)
    diffs = {k: float(np.abs(ours[k] - v).max() / max(1.0, float(np.abs(v).max()))) for k, v in reference.items()}
    key = max(diffs, key=diffs.get)
    return key, diffs[key]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tests.hf_factory import make_checkpoint

    root = tmp_path_factory.mktemp("attention_kernels")
    return {
        "llama3": make_checkpoint(root / "llama3", "llama3")[0],
        "qwen25": make_checkpoint(root / "qwen25", "qwen25")[0],
        "reward": make_checkpoint(root / "reward", "llama3", task="seq_cls")[0],
    }


@pytest.fixture(scope="module")
def xla_results(checkpoints):
    """forward_and_gradients of the xla path, once per checkpoint."""
    cache: dict = {}

    def results(name: str) -> dict:
        if name not in cache:
            cache[name] = forward_and_gradients(load(checkpoints[name], "xla"),
                                                *padded_batch())
        return cache[name]

    return results


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernels' calls (traces), so a test knows its implementation really ran."""
    calls = {"cudnn": 0, "splash": 0}
    for name, fn in (("cudnn", attention_lib._dot_product), ("splash", attention_lib._splash)):
        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(attention_lib, "_dot_product" if name == "cudnn" else "_splash", counted)
    return calls


@pytest.mark.parametrize("name", ["llama3", "qwen25"])
@pytest.mark.parametrize("implementation", KERNELS)
def test_kernel_logits_logprobs_and_gradients_equal_the_xla_path(checkpoints, xla_results, kernel_calls, name,
                                                                 implementation):
    reference = xla_results(name)
    assert kernel_calls == {"cudnn": 0, "splash": 0}
    ours = forward_and_gradients(load(checkpoints[name], implementation), *padded_batch())
    assert kernel_calls[implementation] > 0
    key, worst = largest_difference(ours, reference)
    print(f"{name} {implementation}: largest difference {worst:.1e} ({key})")
    assert worst <= TOLERANCE, key
    assert np.abs(reference["grad ['model']['embed'].value"]).max() > 1e-3  # gradients that are not all ~0


@pytest.mark.parametrize("implementation", KERNELS)
def test_kernel_reward_scores_equal_the_xla_path(checkpoints, implementation):
    ids, mask, positions = padded_batch(seed=2)
    scores = {impl: np.asarray(jitted(load(checkpoints["reward"], impl))(
        jnp.asarray(ids), jnp.asarray(mask)))[:, 0] for impl in ("xla", implementation)}
    assert len({round(float(s), 4) for s in scores["xla"]}) == len(PADDING)  # four rows, four scores
    np.testing.assert_allclose(scores[implementation], scores["xla"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("implementation", KERNELS)
def test_kernel_prefill_fills_the_cache_and_predicts_as_the_xla_prefill(checkpoints, kernel_calls, implementation):
    """A left-padded prompt batch prefilled from slot 0 (as the sampler does), then one decode step."""
    ids, mask, positions = padded_batch(seed=3)
    ids, mask, positions = ids[[0, 3]], mask[[0, 3]], positions[[0, 3]]  # prompts are left-padded only
    results = {}
    for impl in ("xla", implementation):
        model = load(checkpoints["qwen25"], impl)
        cache = model.init_cache(2, SEQ + 1)
        graphdef, state = nnx.split(model)
        prefill = jax.jit(lambda state, *args: nnx.merge(graphdef, state).decode(*args, 0))  # index: Python 0
        decode = jax.jit(lambda state, *args: nnx.merge(graphdef, state).decode(*args))
        logits, cache = prefill(state, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask), cache)
        step, cache = decode(state, jnp.asarray(ids[:, -1:]), jnp.asarray(positions[:, -1:] + 1),
                             jnp.ones((2, 1), bool), cache, jnp.int32(SEQ))
        real_keys = np.where(mask[None, :, None, None, :] == 1, np.asarray(cache.k)[..., :SEQ], 0)  # pad slots:
        results[impl] = (np.asarray(logits)[mask == 1], real_keys, np.asarray(step))  # never read
    assert kernel_calls[implementation] > 0
    for ours, reference in zip(results[implementation], results["xla"]):
        np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


def test_sampler_prefills_through_the_kernel_and_samples_as_with_the_xla_path(checkpoints, kernel_calls):
    """The sampler's prefill (slot 0) takes the kernel; greedy tokens and their log-probs equal the xla path's."""
    from rlmt_jax.sampling import Sampler, SamplingConfig

    prompts = [[5, 9, 17, 33, 2, 8], [40, 41], [7, 7, 7, 90]]  # left-padded to the bucket of 8 by the sampler
    config = SamplingConfig(max_new_tokens=3, temperature=0.0, prompt_buckets=(8,), pad_id=159)
    rollouts = {}
    for impl in ("xla", "cudnn"):
        sampler, params = Sampler.for_model(load(checkpoints["qwen25"], impl), config)
        rollouts[impl] = sampler(params, prompts, jax.random.key(0))
    assert kernel_calls["cudnn"] > 0
    np.testing.assert_array_equal(np.asarray(rollouts["cudnn"].tokens), np.asarray(rollouts["xla"].tokens))
    np.testing.assert_allclose(np.asarray(rollouts["cudnn"].logprobs), np.asarray(rollouts["xla"].logprobs),
                               atol=TOLERANCE, rtol=0)


def test_auto_picks_splash_on_tpu_cudnn_on_gpu_in_half_precision_and_xla_elsewhere():
    assert resolve_attention("auto", "bfloat16", "tpu") == "splash"
    assert resolve_attention("auto", "float32", "tpu") == "splash"
    assert resolve_attention("auto", "bfloat16", "gpu") == "cudnn"
    assert resolve_attention("auto", "float32", "gpu") == "xla"  # cuDNN has no float32 flash attention
    assert resolve_attention("auto", "bfloat16", "cpu") == "xla"
    assert resolve_attention("splash", "float32", "cpu") == "splash"  # a named one is taken as is


def test_cudnn_on_a_gpu_in_float32_names_the_settings_to_change(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ConfigError, match="'cudnn' needs a bfloat16 or float16 compute dtype.*runtime.dtype"):
        attention_lib.kernel_attention(q, q, q, jnp.ones((1, 4), bool), "cudnn")


def test_an_unknown_attention_setting_names_the_key():
    with pytest.raises(ConfigError, match="attention: 'flash'"):
        ModelConfig(attention="flash")
    from rlmt_jax.config import resolve
    from rlmt_jax.errors import UserError

    assert resolve(None, ["runtime.attention=splash"]).runtime.attention == "splash"
    with pytest.raises(UserError, match="runtime.attention"):
        resolve(None, ["runtime.attention=flash"])


# ------------------------------------------------------------------------------------------- 8 devices
def test_kernels_on_eight_devices_equal_the_xla_path_on_one(checkpoints):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, __file__, checkpoints["llama3"]], env=env, capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    observed = json.loads(result.stdout.strip().splitlines()[-1])
    assert observed["device_count"] == 8
    for label, entry in observed["meshes"].items():
        assert entry["per_device"], label  # the kernels ran inside a shard_map
        assert entry["worst"] <= TOLERANCE, (label, entry)


def _sharded_worker(path: str) -> dict:
    """Logits, log-probs and gradients of the kernels (under remat=full) on meshes (data, fsdp, tensor), against
    the xla path on one device: cudnn on 2x2x2 (batch over data x fsdp, kv heads over tensor), splash on 1x2x4
    (tensor 4 does not divide the 2 kv heads: each device keeps whole heads)."""
    from rlmt_jax import mesh as mesh_lib

    batch = padded_batch()
    reference = forward_and_gradients(load(path, "xla"), *batch)
    observed: dict = {"device_count": jax.device_count(), "meshes": {}}
    for sizes, implementation in (((2, 2, 2), "cudnn"), ((1, 2, 4), "splash")):
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*sizes))
        model = load(path, implementation, place=mesh_lib.make_placer(mesh), remat="full")  # the recipes' remat
        graphdef, params = nnx.split(model)
        with mesh_lib.activation_sharding(mesh):
            jaxpr = str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(*map(jnp.asarray, batch)))(params))
            ours = forward_and_gradients(model, *batch)
        key, worst = largest_difference(ours, reference)
        observed["meshes"][f"{'x'.join(map(str, sizes))} {implementation}"] = {
            "worst": worst, "key": key, "per_device": "shard_map" in jaxpr}
    return observed


if __name__ == "__main__":
    print(json.dumps(_sharded_worker(sys.argv[1])))
