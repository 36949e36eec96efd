"""The attention kernels (models/attention.py) against today's xla path, float32, on tiny Llama and Qwen checkpoints.

On CPU the kernels run as they are tested anywhere without the chip: splash in Pallas interpret mode, the cuDNN
route (its row rotation, lengths and layout) through jax.nn.dot_product_attention's XLA implementation. Every
batch holds a left-padded row, a right-padded row, a row padded on both sides and a full row; the checkpoints
have GQA (2:1 and Qwen's 7:1 with qkv bias). Values are compared on real tokens only: a pad query's output is
read by nothing real (and differs between implementations by design).
"""

from __future__ import annotations

import dataclasses
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
from clusters import simulated_devices
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
    """Counts the kernels' calls (traces), so a test knows its implementation really ran ("decode": the GPU
    decode kernel, once per cache block)."""
    calls = {"cudnn": 0, "splash": 0, "decode": 0, "paged": 0}
    for name, attr in (("cudnn", "_dot_product"), ("splash", "_splash"), ("decode", "_decode_block"),
                       ("paged", "_paged_attention")):
        def counted(*args, _fn=getattr(attention_lib, attr), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(attention_lib, attr, counted)
    return calls


@pytest.mark.parametrize("name", ["llama3", "qwen25"])
@pytest.mark.parametrize("implementation", KERNELS)
def test_kernel_logits_logprobs_and_gradients_equal_the_xla_path(checkpoints, xla_results, kernel_calls, name,
                                                                 implementation):
    reference = xla_results(name)
    assert kernel_calls == {"cudnn": 0, "splash": 0, "decode": 0, "paged": 0}
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
        keys = np.asarray(cache.k)  # [layers, batch, kv_heads, head_dim, slots], or heads-major for cudnn's decode
        keys = np.swapaxes(keys, -1, -2) if attention_lib.key_cache_layout(model.config) == "bnsk" else keys
        real_keys = np.where(mask[None, :, None, None, :] == 1, keys[..., :SEQ], 0)  # pad slots:
        results[impl] = (np.asarray(logits)[mask == 1], real_keys, np.asarray(step))  # never read
    assert kernel_calls[implementation] > 0
    for ours, reference in zip(results[implementation], results["xla"]):
        np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


SAMPLER_PROMPTS = [[5, 9, 17, 33, 2, 8, 11, 90, 3], [40, 41], [7, 7, 7, 90, 12]]  # left-padded to 16


def sample(path, implementation: str, config, prompts=SAMPLER_PROMPTS):
    from rlmt_jax.rollout.sampling import Sampler

    sampler, params = Sampler.for_model(load(path, implementation), config)
    return sampler(params, prompts, jax.random.key(0))


def test_sampler_with_the_decode_kernel_samples_as_the_xla_path(checkpoints, kernel_calls):
    """Prefill through the kernel, then decode steps through JAX's GPU decode kernel (interpret mode) over 2
    cache blocks (decode windows; block ends at multiples of 16: slots 0-31 and 32-47), Llama's GQA 2:1,
    prompts of 9, 2 and 5 tokens left-padded to 16, n=2 samples each: greedy tokens equal the xla path's and
    log-probs are within 1e-5. Prompt 1's samples stop on an EOS (a token only they produce, at a step from 3
    to 7: a stopped row keeps being fed, its slots stay one run) while the others run all 20 tokens, into
    block 1."""
    from rlmt_jax.rollout.sampling import SamplingConfig, cache_block_widths

    config = SamplingConfig(n=2, max_new_tokens=20, temperature=0.0, prompt_buckets=(16,), pad_id=159,
                            decode_windows=2)
    assert cache_block_widths(config, 16, attention_lib.DECODE_SLOT_MULTIPLE) == (32, 16)
    free = sample(checkpoints["llama3"], "xla", config)
    others = {t for row in (0, 4) for t in free.response_tokens(row)}
    eos = next(t for t in free.response_tokens(2)[3:8] if t not in others)
    config = dataclasses.replace(config, eos_ids=(eos,))
    rollouts = {impl: sample(checkpoints["llama3"], impl, config) for impl in ("xla", "cudnn")}
    assert kernel_calls["decode"] > 0 and kernel_calls["cudnn"] > 0
    lengths = np.asarray(rollouts["xla"].response_lengths)
    assert 4 <= lengths[2] == lengths[3] <= 8 and lengths[[0, 1, 4, 5]].tolist() == [20] * 4
    np.testing.assert_array_equal(np.asarray(rollouts["cudnn"].tokens), np.asarray(rollouts["xla"].tokens))
    np.testing.assert_array_equal(np.asarray(rollouts["cudnn"].response_lengths), lengths)
    np.testing.assert_allclose(np.asarray(rollouts["cudnn"].logprobs), np.asarray(rollouts["xla"].logprobs),
                               atol=TOLERANCE, rtol=0)


def test_cache_blocks_end_at_multiples_of_16_for_the_decode_kernel_and_as_the_windows_say_otherwise():
    from rlmt_jax.rollout.sampling import SamplingConfig, cache_block_widths

    config = SamplingConfig(max_new_tokens=41, decode_windows=4)  # response blocks (10, 10, 10, 10)
    assert cache_block_widths(config, 16) == (26, 10, 10, 10)
    assert cache_block_widths(config, 16, 16) == (32, 16, 16)  # ends 26, 36, 46, 56 -> 32, 48, 48, 64
    assert cache_block_widths(SamplingConfig(max_new_tokens=1), 8, 16) == (16,)  # nothing fed back
    llama = ModelConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, attention="cudnn")
    assert attention_lib.decode_slot_multiple(llama) == 16 and attention_lib.key_cache_layout(llama) == "bnsk"
    narrow = dataclasses.replace(llama, head_dim=8)  # the kernel's tiles need a head_dim >= 16
    assert attention_lib.decode_slot_multiple(narrow) == 1 and attention_lib.key_cache_layout(narrow) == "bnks"
    splash = dataclasses.replace(llama, attention="splash")  # heads-major keys: the paged kernel's pages
    assert attention_lib.key_cache_layout(splash) == "bnsk" and attention_lib.decode_slot_multiple(splash) == 1
    assert attention_lib.slot_cache_multiple(splash) == 512 and attention_lib.slot_cache_multiple(llama) is None


def test_decode_kernel_lowers_to_triton_for_a_gpu_at_real_shapes(monkeypatch):
    """Lowered for CUDA (no GPU needed): the kernel's tiles are shapes Triton takes (power-of-two loads), for
    Llama-8B's heads (32 of 128 over 8 kv heads) in bfloat16 and blocks of 2048 and 1296 (= 16 x 81) slots."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # not interpret mode
    q = jax.ShapeDtypeStruct((2, 1, 32, 128), jnp.bfloat16)
    blocks = [jax.ShapeDtypeStruct((2, 8, width, 128), jnp.bfloat16) for width in (2048, 1296)]
    rows = jax.ShapeDtypeStruct((2,), jnp.int32)
    step = jax.jit(lambda q, k, v, start, end: attention_lib.decode_attention(q, k, v, attention_lib.CacheRows(
        start, end)))
    text = step.trace(q, blocks, blocks, rows, rows).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # one kernel per block
    assert attention_lib._decode_tiling(2048) == (128, 16) and attention_lib._decode_tiling(1296) == (16, 9)


def test_decode_kernel_blocks_merge_to_grouped_attention_over_each_rows_slots():
    """decode_attention over two blocks (32 + 16 slots) against grouped_attention with the dense mask, rows
    attending to different runs: one spanning both blocks, one inside each block, one of a single slot at the
    block edge. Shifting any row's start or end by one slot changes its output (the wiring is pinned)."""
    from models.layers import grouped_attention

    rng = np.random.default_rng(0)
    batch, kv, group, hd, widths = 4, 2, 3, 8, (32, 16)
    q = jnp.asarray(rng.normal(size=(batch, 1, kv * group, hd)), jnp.float32)
    keys = [jnp.asarray(rng.normal(size=(batch, kv, w, hd)), jnp.float32) for w in widths]
    values = [jnp.asarray(rng.normal(size=(batch, kv, w, hd)), jnp.float32) for w in widths]
    run = jax.jit(attention_lib.decode_attention)

    def reference(start, end):
        slots = np.arange(sum(widths))[None]
        mask = (slots >= np.asarray(start)[:, None]) & (slots < np.asarray(end)[:, None])
        return np.asarray(grouped_attention(q, keys, values, jnp.asarray(mask)[:, None], "bnsk", "bnsk"))

    start, end = np.array([3, 20, 33, 31]), np.array([45, 30, 47, 32])
    ours = np.asarray(run(q, keys, values, attention_lib.CacheRows(jnp.asarray(start), jnp.asarray(end))))
    np.testing.assert_allclose(ours, reference(start, end), atol=1e-6, rtol=0)
    for shifted in (start - 1, start + 1):
        assert np.abs(ours - reference(shifted, end)).max(axis=(1, 2, 3)).min() > 1e-3
    for shifted in (end - 1, end + 1):
        assert np.abs(ours - reference(start, shifted)).max(axis=(1, 2, 3)).min() > 1e-3


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
    from rlmt_jax.settings.config import resolve
    from rlmt_jax.core.errors import UserError

    assert resolve(None, ["runtime.attention=splash"]).runtime.attention == "splash"
    with pytest.raises(UserError, match="runtime.attention"):
        resolve(None, ["runtime.attention=flash"])


# ------------------------------------------------------------------------------------------- 8 devices
def test_kernels_on_eight_devices_equal_the_xla_path_on_one(checkpoints):
    env = simulated_devices(8)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, __file__, checkpoints["llama3"]], env=env, capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    observed = json.loads(result.stdout.strip().splitlines()[-1])
    assert observed["device_count"] == 8
    for label, entry in observed["meshes"].items():
        assert entry["per_device"], label  # the kernels ran inside a shard_map
        assert entry["worst"] <= TOLERANCE, (label, entry)
    sampler = observed["sampler"]  # the decode kernel in a decode layout data=4 x tensor=2
    assert sampler["tokens_equal"] and sampler["worst_logprob"] <= TOLERANCE, sampler
    assert [2, 1, 2, 16] in sampler["decode_q_shapes"], sampler  # per device: 8 rows / 4, 2 kv heads / 2


def _sharded_worker(path: str) -> dict:
    """Logits, log-probs and gradients of the kernels (under remat=full) on meshes (data, fsdp, tensor), against
    the xla path on one device: cudnn on 2x2x2 (batch over data x fsdp, kv heads over tensor), splash on 1x2x4
    (tensor 4 does not divide the 2 kv heads: each device keeps whole heads)."""
    from rlmt_jax.scale import mesh as mesh_lib

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
    observed["sampler"] = _sharded_sampler(path)
    return observed


def _sharded_sampler(path: str) -> dict:
    """The sampler with the decode kernel in a decode layout (data 4 x tensor 2: rows over data, Llama's 2 kv
    heads over tensor) against the xla path on one device, greedy, 2 windows, n=2 (4 prompts: 8 rows); and the
    q shapes the kernel was traced with (per device inside the shard_map; the global one when per_device_map
    evaluates the output's shape)."""
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import RolloutMeshConfig
    from rlmt_jax.rollout.sampling import DecodeLayout, Sampler, SamplingConfig

    shapes = set()
    kernel = attention_lib._decode_block

    def recorded(q, *args, **kwargs):
        shapes.add(tuple(q.shape))
        return kernel(q, *args, **kwargs)

    attention_lib._decode_block = recorded
    prompts = [*SAMPLER_PROMPTS, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
    config = SamplingConfig(n=2, max_new_tokens=20, temperature=0.0, prompt_buckets=(16,), pad_id=159,
                            decode_windows=2)
    reference = sample(path, "xla", config, prompts)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(4, 2, 1))
    layout = DecodeLayout.of(mesh, RolloutMeshConfig(data=4, tensor=2), "float32")
    sampler, params = Sampler.for_model(load(path, "cudnn"), config)
    sampler = Sampler(sampler.graphdef, config, layout=layout)
    ours = sampler(params, prompts, jax.random.key(0))
    return {"tokens_equal": bool(np.array_equal(np.asarray(ours.tokens), np.asarray(reference.tokens))),
            "worst_logprob": float(np.abs(np.asarray(ours.logprobs) - np.asarray(reference.logprobs)).max()),
            "decode_q_shapes": sorted(list(shape) for shape in shapes)}


if __name__ == "__main__":
    print(json.dumps(_sharded_worker(sys.argv[1])))


def test_slot_engine_with_the_decode_kernel_samples_as_the_static_xla_sampler(checkpoints, kernel_calls):
    """The slot engine's decode steps through the GPU decode kernel (interpret mode): each slot attends to its own
    run of slots 0 .. its write slot (CacheRows with an end per row), over 2 cache blocks; rows wait for the 2
    slots and take them as others stop. Greedy tokens equal the static xla sampler's, log-probs within 1e-5."""
    from rlmt_jax.rollout.sampling import SamplingConfig
    from rlmt_jax.rollout.slot_sampler import SlotSampler

    config = SamplingConfig(n=2, max_new_tokens=20, temperature=0.0, prompt_buckets=(16,), pad_id=159,
                            decode_windows=2)
    free = sample(checkpoints["llama3"], "xla", config)
    others = {t for row in (0, 4) for t in free.response_tokens(row)}
    config = dataclasses.replace(config, eos_ids=(next(t for t in free.response_tokens(2)[3:8] if t not in others),))
    reference = sample(checkpoints["llama3"], "xla", config)
    graphdef, params = nnx.split(load(checkpoints["llama3"], "cudnn"))
    engine = SlotSampler(graphdef, config, slots=2, chunk_tokens=4)
    rollout = engine(params, SAMPLER_PROMPTS, jax.random.key(0))
    assert kernel_calls["decode"] > 0
    np.testing.assert_array_equal(rollout.tokens, np.asarray(reference.tokens))
    np.testing.assert_array_equal(rollout.response_lengths, np.asarray(reference.response_lengths))
    np.testing.assert_allclose(rollout.logprobs, np.asarray(reference.logprobs), atol=TOLERANCE, rtol=0)


def test_paged_kernel_reads_each_rows_slots_from_0_to_its_end():
    """paged_decode (JAX's TPU paged-attention kernel, TPU interpret mode) against grouped_attention with the
    dense mask over one 512-slot block (8 pages of 64), GQA 2:1 taken as one sequence per (row, kv head): rows
    ending at slot 1, at a page edge, just past one and deep in the block. Shifting any row's end by one slot
    changes its output, so the page table and lengths are pinned. Values are bfloat16-exact (interpret mode's
    dots round their operands to bfloat16, as a TPU's default precision does) and head_dim 64 makes the
    1/sqrt(head_dim) scale exact."""
    from models.layers import grouped_attention

    rng = np.random.default_rng(0)
    batch, kv, group, hd, width = 4, 2, 2, 64, attention_lib.PAGED_SLOT_MULTIPLE

    def bf16_exact(shape):
        return jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)

    q, keys, values = bf16_exact((batch, 1, kv * group, hd)), bf16_exact((batch, kv, width, hd)), \
        bf16_exact((batch, kv, width, hd))
    run = jax.jit(attention_lib.paged_decode)

    def reference(end):
        mask = np.arange(width)[None] < np.asarray(end)[:, None]
        return np.asarray(grouped_attention(q, keys, values, jnp.asarray(mask)[:, None], "bnsk", "bnsk"))

    end = np.array([1, 64, 65, 300])
    ours = np.asarray(run(q, keys, values, jnp.asarray(end)))
    np.testing.assert_allclose(ours, reference(end), atol=1e-5, rtol=0)
    for shifted in (end + 1, np.maximum(end - 1, 2)):
        changed = np.abs(ours - reference(shifted)).max(axis=(1, 2, 3))
        assert (changed[shifted != end] > 1e-3).all()
    with pytest.raises(ValueError, match="multiple of 512"):
        run(q, keys[:, :, :256], values[:, :, :256], jnp.asarray(end))


def test_slot_engine_with_the_paged_kernel_samples_as_the_static_xla_sampler(checkpoints, kernel_calls):
    """attention splash: the slot engine's decode steps through the paged kernel (TPU interpret mode), each slot
    one block of 512 slots read from slot 0 to its write slot; 6 rows through 2 slots, so rows take slots
    others freed (their pages hold the previous row's keys past the new row's length). Greedy tokens equal the
    static xla sampler's; log-probs within 1e-3 (interpret mode's dots round to bfloat16)."""
    from rlmt_jax.rollout.sampling import SamplingConfig
    from rlmt_jax.rollout.slot_programs import slot_widths
    from rlmt_jax.rollout.slot_sampler import SlotSampler

    config = SamplingConfig(n=2, max_new_tokens=12, temperature=0.0, prompt_buckets=(16,), pad_id=159)
    free = sample(checkpoints["llama3"], "xla", config)
    others = {t for row in (0, 4) for t in free.response_tokens(row)}
    config = dataclasses.replace(config, eos_ids=(next(t for t in free.response_tokens(2)[3:8] if t not in others),))
    reference = sample(checkpoints["llama3"], "xla", config)
    lengths = np.asarray(reference.response_lengths)
    assert lengths[2] < 12 and lengths[0] == 12  # rows free their slots at different steps
    model = load(checkpoints["llama3"], "splash")
    assert slot_widths(config, model.config, 16) == (512,)
    graphdef, params = nnx.split(model)
    rollout = SlotSampler(graphdef, config, slots=2, chunk_tokens=4)(params, SAMPLER_PROMPTS, jax.random.key(0))
    assert kernel_calls["paged"] > 0 and kernel_calls["decode"] == 0
    np.testing.assert_array_equal(rollout.tokens, np.asarray(reference.tokens))
    np.testing.assert_array_equal(rollout.response_lengths, lengths)
    np.testing.assert_allclose(rollout.logprobs, np.asarray(reference.logprobs), atol=1e-3, rtol=0)
