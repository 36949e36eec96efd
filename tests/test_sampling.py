"""The rollout sampler on tiny checkpoints: greedy == transformers generate, log-probs == a teacher-forced
forward, EOS handling, groups, padding invariance, bucket compile counts, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import models
from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.sampling import (
    STOP_EOS,
    STOP_LENGTH,
    Sampler,
    SamplingConfig,
    bucket_length,
    default_prompt_buckets,
    left_pad,
    token_positions,
)
from tests.hf_factory import PAD_ID, make_checkpoint

EOS = (2, 3)
PROMPTS = [[5, 17, 99, 42, 8, 130, 77, 61, 12, 90, 33], [140, 7, 56], [21, 21, 64, 9, 150, 88, 3 + 100]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama31"), "llama31")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen25"), "qwen25")


@functools.lru_cache(maxsize=None)
def _loaded(path, scan_layers):
    return nnx.split(models.load_pretrained(path, scan_layers=scan_layers))


@functools.lru_cache(maxsize=None)
def _sampler(path, scan_layers, settings):
    graphdef, params = _loaded(path, scan_layers)
    return Sampler(graphdef, SamplingConfig(**dict(settings))), params


def sampler_for(path, scan_layers=False, **settings):
    """A sampler and its params; tests asking for the same settings share one (and its compiled programs)."""
    settings = {"pad_id": PAD_ID, "prompt_buckets": (16, 32), **settings}
    return _sampler(path, scan_layers, tuple(sorted(settings.items())))


def fresh_sampler_for(path, **settings):
    graphdef, params = _loaded(path, False)
    return Sampler(graphdef, SamplingConfig(**{"pad_id": PAD_ID, "prompt_buckets": (16, 32), **settings})), params


def hf_greedy(reference, prompts, new_tokens):
    """transformers generate(do_sample=False) on the left-padded batch -> responses [B, new_tokens]."""
    ids, mask = left_pad(prompts, max(map(len, prompts)), PAD_ID)
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=new_tokens, eos_token_id=list(EOS), pad_token_id=PAD_ID,
        ).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, new_tokens - out.shape[1])), constant_values=PAD_ID)


@pytest.mark.parametrize("name, scan_layers, decode_windows", [
    ("llama", False, None), ("qwen", False, None), ("qwen", True, None), ("llama", False, 3), ("qwen", True, 4)])
def test_greedy_equals_transformers_generate_on_a_left_padded_batch(request, name, scan_layers, decode_windows):
    path, reference = request.getfixturevalue(name)
    sampler, params = sampler_for(path, scan_layers, temperature=0.0, max_new_tokens=16, eos_ids=EOS,
                                  decode_windows=decode_windows)
    rollout = sampler(params, PROMPTS, jax.random.key(0))
    ours = np.asarray(rollout.tokens[:, rollout.prompt_len:])
    theirs = hf_greedy(reference, PROMPTS, 16)
    np.testing.assert_array_equal(ours, theirs)
    for row, prompt in enumerate(PROMPTS):  # the prompt sits right-aligned before column P
        assert np.asarray(rollout.tokens[row, 16 - len(prompt):16]).tolist() == prompt


def test_greedy_in_a_decode_layout_equals_transformers_generate(qwen):
    # the trainer's path: a float32 copy of the params in the decode layout (one device here; 8 devices in
    # tests/test_rollout_layout.py), made and dropped by every call
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import RolloutMeshConfig
    from rlmt_jax.rollout.sampling import DecodeLayout

    path, reference = qwen
    graphdef, params = _loaded(path, True)
    layout = DecodeLayout.of(mesh_lib.make_mesh(mesh_lib.MeshConfig()), RolloutMeshConfig(), "float32")
    sampler = Sampler(graphdef, SamplingConfig(pad_id=PAD_ID, prompt_buckets=(16,), temperature=0.0,
                                               max_new_tokens=16, eos_ids=EOS), layout=layout)
    rollout = sampler(params, PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(rollout.tokens[:, 16:]), hf_greedy(reference, PROMPTS, 16))


def test_greedy_rows_equal_the_same_prompts_run_alone(llama):
    sampler, params = sampler_for(llama[0], temperature=0.0, max_new_tokens=16, eos_ids=EOS)
    batch = sampler(params, PROMPTS, jax.random.key(0))
    for row, prompt in enumerate(PROMPTS):
        alone = sampler(params, [prompt], jax.random.key(0))
        assert batch.response_tokens(row) == alone.response_tokens(0)
        np.testing.assert_allclose(batch.logprobs[row, 16:], alone.logprobs[0, 16:], atol=1e-5)


def test_sampled_tokens_do_not_depend_on_the_bucket_length(llama):
    settings = dict(temperature=1.0, top_p=0.9, n=2, max_new_tokens=10)
    short, params = sampler_for(llama[0], prompt_buckets=(16,), **settings)
    long, _ = sampler_for(llama[0], prompt_buckets=(48,), **settings)
    a = short(params, PROMPTS, jax.random.key(3))
    b = long(params, PROMPTS, jax.random.key(3))
    np.testing.assert_array_equal(a.tokens[:, 16:], b.tokens[:, 48:])
    np.testing.assert_allclose(a.logprobs[:, 16:], b.logprobs[:, 48:], atol=1e-5)


@pytest.mark.parametrize("name, temperature, top_p, top_k, decode_windows", [
    ("llama", 0.7, 1.0, None, None), ("qwen", 1.3, 0.8, 20, None), ("llama", 1.0, 1.0, None, 3)])
def test_logprobs_equal_a_teacher_forced_forward_at_the_same_temperature(
    request, name, temperature, top_p, top_k, decode_windows
):
    path, _ = request.getfixturevalue(name)
    sampler, params = sampler_for(
        path, n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16, eos_ids=EOS,
        decode_windows=decode_windows,
    )
    rollout = sampler(params, PROMPTS, jax.random.key(1))
    model = models.load_pretrained(path)
    # The trainer's forward: the same [R, P+N] tokens, mask = prompt | response, positions = cumsum - 1.
    logits = model(rollout.tokens, rollout.attention_mask, rollout.positions)
    logp = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
    forward = jnp.take_along_axis(logp, rollout.tokens[:, 1:, None], axis=-1)[..., 0]
    forward = jnp.pad(forward, ((0, 0), (1, 0)))  # position t holds the log-prob of token t
    mask = np.asarray(rollout.response_mask)
    assert mask.sum() > 20
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[mask], np.asarray(forward)[mask], atol=1e-5)
    assert np.all(np.asarray(rollout.logprobs)[~mask] == 0)


def test_top_k_1_equals_greedy(qwen):
    greedy, params = sampler_for(qwen[0], temperature=0.0, max_new_tokens=16, eos_ids=EOS)
    top1, _ = sampler_for(qwen[0], temperature=0.9, top_k=1, max_new_tokens=16, eos_ids=EOS)
    a = greedy(params, PROMPTS, jax.random.key(0))
    b = top1(params, PROMPTS, jax.random.key(5))
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("which, step", [("only", 3), ("second", 3), ("only", 0)])
def test_eos_stops_a_row_and_masks_what_follows(llama, which, step):
    path = llama[0]
    free, params = sampler_for(path, temperature=0.0, max_new_tokens=10)
    responses = np.asarray(free(params, PROMPTS, jax.random.key(0)).tokens[:, 16:])
    # Pick as EOS the token row 0 produces at `step` (0: the prefill's token; no row produces it earlier).
    stop_token = int(responses[0, step])
    first = [int(np.flatnonzero(r == stop_token)[0]) if stop_token in r else None for r in responses]
    assert first[0] <= step
    # "second": the stop token is the second of two EOS ids (Llama-3.1-Instruct lists several); the first never occurs
    never = next(t for t in range(4, 200) if t not in responses)
    eos_ids = (stop_token,) if which == "only" else (never, stop_token)
    stopped, _ = sampler_for(path, temperature=0.0, max_new_tokens=10, eos_ids=eos_ids)
    rollout = stopped(params, PROMPTS, jax.random.key(0))
    for row, at in enumerate(first):
        length = 10 if at is None else at + 1
        assert int(rollout.response_lengths[row]) == length
        assert int(rollout.stop_reason[row]) == (STOP_LENGTH if at is None else STOP_EOS)
        tokens = np.asarray(rollout.tokens[row, 16:])
        np.testing.assert_array_equal(tokens[:length], responses[row, :length])
        assert np.all(tokens[length:] == PAD_ID)
        assert np.asarray(rollout.response_mask[row, 16:]).tolist() == [True] * length + [False] * (10 - length)
        assert np.all(np.asarray(rollout.logprobs[row, 16 + length:]) == 0)
        assert np.all(np.asarray(rollout.logprobs[row, 16:16 + length]) < 0)


def test_samples_of_one_prompt_differ_and_share_its_prompt(qwen):
    sampler, params = sampler_for(qwen[0], n=4, temperature=1.0, max_new_tokens=12)
    rollout = sampler(params, [PROMPTS[0], PROMPTS[1]], jax.random.key(2))
    assert rollout.tokens.shape == (8, 16 + 12) and rollout.group_size == 4
    tokens = np.asarray(rollout.tokens)
    for group in range(2):
        rows = tokens[4 * group:4 * group + 4]
        assert all((rows[:, :16] == rows[0, :16]).all(axis=1))
        responses = {tuple(r[16:]) for r in rows}
        assert len(responses) == 4
    assert np.asarray(rollout.prompt_lengths).tolist() == [11] * 4 + [3] * 4


def test_layout_masks_positions_and_lengths(llama):
    sampler, params = sampler_for(llama[0], n=2, temperature=1.0, max_new_tokens=5)
    rollout = sampler(params, [[10, 11, 12], [13]], jax.random.key(0))
    assert rollout.prompt_len == 16
    prompt_mask = np.asarray(rollout.prompt_mask)
    assert prompt_mask[0].tolist() == [False] * 13 + [True] * 3 + [False] * 5
    assert prompt_mask[3].tolist() == [False] * 15 + [True] + [False] * 5
    assert np.asarray(rollout.response_mask)[0].tolist() == [False] * 16 + [True] * 5
    assert np.asarray(rollout.positions)[0, 13:].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert np.asarray(rollout.positions)[3, 15:].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.asarray(rollout.response_lengths).tolist() == [5, 5, 5, 5]
    assert np.asarray(rollout.stop_reason).tolist() == [STOP_LENGTH] * 4


def test_compiled_programs_stay_the_same_for_prompt_lengths_inside_one_bucket(llama):
    sampler, params = fresh_sampler_for(llama[0], n=2, temperature=0.7, max_new_tokens=4)
    key = jax.random.key(0)
    sampler(params, [[1] * 5, [2] * 9], key)
    assert sampler.compiled_programs() == 2  # prefill + decode for (2 prompts, bucket 16)
    sampler(params, [[3] * 13, [4] * 2], key)
    sampler(params, [[5] * 16, [6] * 1], key)
    assert sampler.compiled_programs() == 2
    sampler(params, [[7] * 17, [8] * 3], key)  # bucket 32
    assert sampler.compiled_programs() == 4
    sampler(params, [[7] * 30, [8] * 20], key)
    assert sampler.compiled_programs() == 4


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_windows_sample_what_one_window_samples(llama, scan_layers):
    settings = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, eos_ids=EOS)
    whole, params = sampler_for(llama[0], scan_layers, **settings)
    windowed, _ = sampler_for(llama[0], scan_layers, decode_windows=3, **settings)  # windows of 4, 4, 3 slots
    assert windowed.config.response_blocks() == (4, 4, 3)
    a = whole(params, PROMPTS, jax.random.key(7))
    b = windowed(params, PROMPTS, jax.random.key(7))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    np.testing.assert_array_equal(a.response_lengths, b.response_lengths)
    np.testing.assert_array_equal(a.stop_reason, b.stop_reason)
    assert windowed.compiled_programs() == 2


def test_a_row_stopped_in_the_first_decode_window_stays_stopped_in_the_later_ones(llama):
    path = llama[0]
    free, params = sampler_for(path, temperature=0.0, max_new_tokens=10)
    first = np.asarray(free(params, [PROMPTS[0]], jax.random.key(0)).tokens[0, 16:])
    # the row's second token as EOS: it stops in the first window of 3 steps; later windows write only padding
    stopped, _ = sampler_for(path, temperature=0.0, max_new_tokens=10, eos_ids=(int(first[1]),), decode_windows=3)
    rollout = stopped(params, [PROMPTS[0]], jax.random.key(0))
    stop_at = int(np.flatnonzero(first == first[1])[0])
    assert int(rollout.response_lengths[0]) == stop_at + 1 and int(rollout.stop_reason[0]) == STOP_EOS
    assert np.asarray(rollout.tokens[0, 16 + stop_at + 1:]).tolist() == [PAD_ID] * (10 - stop_at - 1)


def test_response_blocks_split_the_fed_back_slots_into_the_windows():
    assert SamplingConfig(max_new_tokens=10, decode_windows=1).response_blocks() == (9,)
    assert SamplingConfig(max_new_tokens=10, decode_windows=3).response_blocks() == (3, 3, 3)
    assert SamplingConfig(max_new_tokens=11, decode_windows=3).response_blocks() == (4, 4, 2)
    assert SamplingConfig(max_new_tokens=3, decode_windows=4).response_blocks() == (1, 1)  # fewer slots than windows
    assert SamplingConfig(max_new_tokens=1, decode_windows=4).response_blocks() == ()
    # automatic: one window for short responses, 4 from MIN_TOKENS_FOR_WINDOWS new tokens on
    assert SamplingConfig(max_new_tokens=127).response_blocks() == (126,)
    assert SamplingConfig(max_new_tokens=128).response_blocks() == (32, 32, 32, 31)
    assert SamplingConfig(max_new_tokens=4096).windows == 4
    with pytest.raises(UserError, match="decode_windows"):
        SamplingConfig(decode_windows=0)


def test_bfloat16_cache_gives_logprobs_close_to_the_float32_forward(qwen):
    path = qwen[0]
    sampler, params = sampler_for(path, temperature=1.0, max_new_tokens=8, cache_dtype="bfloat16")
    rollout = sampler(params, PROMPTS, jax.random.key(4))
    model = models.load_pretrained(path)
    logits = model(rollout.tokens, rollout.attention_mask, rollout.positions)
    forward = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), rollout.tokens[:, 1:, None], axis=-1)[..., 0]
    mask = np.asarray(rollout.response_mask)[:, 1:]
    gap = np.abs(np.asarray(rollout.logprobs)[:, 1:][mask] - np.asarray(forward)[mask])
    # measured 4e-4 .. 7e-4 over six keys (5e-4 with this one); a float32 cache would be ~1e-6 off
    assert 1e-5 < gap.max() < 2e-3


def test_buckets_padding_and_positions_helpers():
    assert default_prompt_buckets(1024) == (16, 32, 64, 128, 256, 512, 1024)
    assert default_prompt_buckets(896) == (16, 32, 64, 128, 256, 512, 896)
    assert [bucket_length(n, (16, 32, 48)) for n in (1, 16, 17, 48)] == [16, 16, 32, 48]
    ids, mask = left_pad([[7, 8], [9]], 4, 0)
    assert ids.tolist() == [[0, 0, 7, 8], [0, 0, 0, 9]]
    assert mask.tolist() == [[False, False, True, True], [False, False, False, True]]
    positions = token_positions(jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))
    assert np.asarray(positions).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_user_errors_name_what_is_wrong(llama):
    with pytest.raises(UserError, match="sampling top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(UserError, match="sampling prompt_buckets"):
        SamplingConfig(prompt_buckets=(32, 16))
    with pytest.raises(UserError, match="sampling cache_dtype"):
        SamplingConfig(cache_dtype="int8")
    sampler, params = sampler_for(llama[0], max_new_tokens=2)
    with pytest.raises(UserError, match="33 tokens is longer than the largest bucket 32"):
        sampler(params, [[1] * 33], jax.random.key(0))
    with pytest.raises(UserError, match="prompt 1 is empty"):
        sampler(params, [[1], []], jax.random.key(0))
