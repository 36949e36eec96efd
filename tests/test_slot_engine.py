"""The slot engine (rollout.engine: slots) on tiny checkpoints: the static sampler's rollouts, token for token,
whatever the number of slots; rows prefilled into freed slots; greedy == transformers; log-probs == a
teacher-forced forward; the cache written at a slot per row; each row's own random stream; compiles; errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.decode import STOP_EOS, STOP_LENGTH, row_uniforms
from rlmt_jax.rollout.sampling import Sampler, SamplingConfig
from rlmt_jax.rollout.slot_sampler import SlotSampler, _admission_bucket
from tests.hf_factory import PAD_ID
from tests.test_sampling import EOS, PROMPTS, _loaded, hf_greedy, llama, qwen  # noqa: F401  (fixtures)

# 4 prompts of different lengths (right-padding bugs show), x n=3 = 12 rows
MORE_PROMPTS = [*PROMPTS, [77, 5, 19, 140, 4]]
FIELDS = ("tokens", "prompt_mask", "response_mask", "prompt_lengths", "response_lengths", "stop_reason")


def config(**settings) -> SamplingConfig:
    return SamplingConfig(**{"pad_id": PAD_ID, "prompt_buckets": (16, 32), "eos_ids": EOS, **settings})


def both(path, scan_layers=False, slots=2, chunk_tokens=3, **settings):
    """(static sampler, slot sampler, params) for the same sampling settings; tests asking for the same ones share
    them (and their compiled programs)."""
    return _both(path, scan_layers, slots, chunk_tokens, tuple(sorted(settings.items())))


@functools.lru_cache(maxsize=None)
def _both(path, scan_layers, slots, chunk_tokens, settings):
    graphdef, params = _loaded(path, scan_layers)
    cfg = config(**dict(settings))
    return Sampler(graphdef, cfg), SlotSampler(graphdef, cfg, slots=slots, chunk_tokens=chunk_tokens), params


def assert_same_rollout(static, slots):
    for field in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(slots, field)), np.asarray(getattr(static, field)),
                                      err_msg=field)
    assert np.isfinite(np.asarray(slots.logprobs)).all()
    np.testing.assert_allclose(np.asarray(slots.logprobs), np.asarray(static.logprobs), atol=1e-5)
    assert (slots.prompt_len, slots.group_size) == (static.prompt_len, static.group_size)


@pytest.mark.parametrize("name, scan_layers", [("llama", False), ("qwen", True)])
def test_greedy_equals_transformers_and_the_static_sampler_with_rows_in_freed_slots(request, name, scan_layers):
    path, reference = request.getfixturevalue(name)
    static, slots, params = both(path, scan_layers, slots=1, temperature=0.0, max_new_tokens=16)
    rollout = slots(params, PROMPTS, jax.random.key(0))  # one slot: rows 1 and 2 wait for it, then fill it
    np.testing.assert_array_equal(rollout.tokens[:, 16:], hf_greedy(reference, PROMPTS, 16))
    assert_same_rollout(static(params, PROMPTS, jax.random.key(0)), rollout)


@pytest.mark.parametrize("slots, chunk_tokens, windows", [
    pytest.param(12, 5, None, marks=pytest.mark.slow),  # slots = rows: (3, 3, 3) and (1, 4, 3) cover fewer
    (3, 3, 3), (1, 4, 3),
    pytest.param(5, 1, 2, marks=pytest.mark.slow)])
def test_seeded_sampling_gives_the_static_rollout_whatever_the_slots(llama, slots, chunk_tokens, windows):
    static, engine, params = both(llama[0], slots=slots, chunk_tokens=chunk_tokens, n=3, temperature=1.0,
                                  max_new_tokens=14, decode_windows=windows)
    reference = static(params, MORE_PROMPTS, jax.random.key(7))
    rollout = engine(params, MORE_PROMPTS, jax.random.key(7))
    assert_same_rollout(reference, rollout)
    lengths = np.asarray(rollout.response_lengths)
    assert len(set(lengths.tolist())) > 2 and 14 in lengths and lengths.min() < 14  # rows stop apart
    assert set(np.asarray(rollout.stop_reason).tolist()) == {STOP_EOS, STOP_LENGTH}


def test_rows_wait_for_slots_and_fill_them_as_others_stop(llama, monkeypatch):
    _, engine, params = both(llama[0], slots=4, chunk_tokens=2, n=3, temperature=1.0, max_new_tokens=14)
    admitted, calls, sources = [], [], []
    put = engine._put

    def recording(arrays):  # the host's admissions: (prompt, slot, row id) of each admitted row
        if len(arrays) == 3:
            source, slot_ids, row_ids = (np.asarray(a) for a in arrays)
            taken = slot_ids < engine.slots
            sources.append(source[taken].tolist())
            calls.append(slot_ids[taken].tolist())
            admitted.append(row_ids[taken].tolist())
        return put(arrays)

    monkeypatch.setattr(engine, "_put", recording)
    engine(params, MORE_PROMPTS, jax.random.key(7))
    assert admitted[0] == [0, 1, 2, 3] and calls[0] == [0, 1, 2, 3]  # the first rows fill every slot
    assert len(admitted) > 2  # the rest came in as slots freed, in row order, each row once
    assert sum(admitted, []) == list(range(12))
    assert all(0 <= slot < 4 for call in calls for slot in call)
    assert sum(sources, []) == [row // 3 for row in range(12)]  # each row copies its own prompt's cache


@pytest.mark.parametrize("name, temperature, top_p, top_k", [
    ("llama", 0.7, 1.0, None), pytest.param("qwen", 1.3, 0.8, 20, marks=pytest.mark.slow)])
def test_logprobs_equal_a_teacher_forced_forward(request, name, temperature, top_p, top_k):
    path, _ = request.getfixturevalue(name)
    _, engine, params = both(path, slots=2, n=2, temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=16)
    rollout = engine(params, PROMPTS, jax.random.key(1))
    model = models.load_pretrained(path)
    logits = model(jnp.asarray(rollout.tokens), jnp.asarray(rollout.attention_mask), rollout.positions)
    logp = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
    forward = jnp.take_along_axis(logp, jnp.asarray(rollout.tokens)[:, 1:, None], axis=-1)[..., 0]
    forward = np.pad(np.asarray(forward), ((0, 0), (1, 0)))
    mask = np.asarray(rollout.response_mask)
    assert mask.sum() > 20
    np.testing.assert_allclose(rollout.logprobs[mask], forward[mask], atol=1e-5)
    assert np.all(rollout.logprobs[~mask] == 0)


def test_a_first_token_eos_and_one_new_token_stop_at_admission(llama):
    static, engine, params = both(llama[0], slots=2, temperature=0.0, max_new_tokens=6, eos_ids=())
    first = [int(t) for t in np.asarray(static(params, PROMPTS, jax.random.key(0)).tokens[:, 16])]
    for settings in ({"eos_ids": (first[1],)}, {"max_new_tokens": 1}):
        static, engine, params = both(llama[0], slots=2, temperature=0.0, **{"max_new_tokens": 6, **settings})
        rollout = engine(params, PROMPTS, jax.random.key(0))
        assert_same_rollout(static(params, PROMPTS, jax.random.key(0)), rollout)
        assert int(rollout.response_lengths[1]) == 1


@pytest.mark.slow  # every slot test decodes through it and compares with the static sampler
def test_a_cache_slot_per_row_equals_each_row_decoded_alone(llama):
    """models: decode_hidden_states with index [batch] writes and attends row by row."""
    model = models.load_pretrained(llama[0])
    prompts = [[5, 17, 99, 42, 8], [140, 7]]
    cache = model.init_cache(2, 8)
    ids = jnp.asarray([[5, 17, 99, 42, 8], [140, 7, PAD_ID, PAD_ID, PAD_ID]])
    mask = jnp.asarray([[True] * 5, [True, True, False, False, False]])
    _, cache = model.decode(ids, jnp.broadcast_to(jnp.arange(5), (2, 5)), mask, cache, 0)
    index = jnp.asarray([5, 2])  # each row's next slot; row 1 overwrites its pads
    logits, batch_cache = model.decode(jnp.asarray([[9], [11]]), index[:, None], jnp.ones((2, 1), bool), cache, index)
    for row, (prompt, token) in enumerate(zip(prompts, (9, 11))):
        alone = model(jnp.asarray([prompt + [token]]))[0, -1]
        np.testing.assert_allclose(logits[row, 0], alone, atol=1e-5)
    valid = np.asarray(batch_cache.valid)
    assert valid[0].tolist() == [True] * 6 + [False] * 2
    assert valid[1].tolist() == [True] * 3 + [False] * 5


def test_each_row_draws_from_its_own_stream():
    key = jax.random.key(3)
    alone = row_uniforms(key, jnp.asarray([5]), 2)
    among = row_uniforms(key, jnp.asarray([0, 5, 9]), jnp.asarray([7, 2, 2]))
    assert float(among[1]) == float(alone[0])  # the same row and token, wherever it sits
    assert len({float(x) for x in row_uniforms(key, jnp.arange(4), 2)}) == 4
    assert float(row_uniforms(key, jnp.asarray([5]), 3)[0]) != float(alone[0])


def test_programs_compile_once_per_window_and_admission_bucket(llama):
    _, engine, params = both(llama[0], slots=4, chunk_tokens=4, n=2, temperature=1.0, max_new_tokens=12,
                             decode_windows=2)
    engine(params, PROMPTS, jax.random.key(0))
    first = engine.compiled_programs()
    engine(params, [[3, 4, 5], [6] * 9, [7, 8], [1, 2, 3, 4]], jax.random.key(1))  # same bucket, more rows
    # empty state 1, a prefill per prompt count (3, 4) 2, windows <= 2, admission buckets of 1, 2 and 4 rows <= 3
    assert first <= engine.compiled_programs() <= 1 + 2 + 2 + 3
    assert [_admission_bucket(k, 8, 1) for k in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert _admission_bucket(3, 8, 2) == 4 and _admission_bucket(1, 8, 2) == 2


def test_bad_settings_name_the_key():
    graphdef, _ = nnx.split(models.build_model(models.ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1), nnx.Rngs(0)))
    with pytest.raises(UserError, match="rollout slots: must be >= 1"):
        SlotSampler(graphdef, config(), slots=0)
    with pytest.raises(UserError, match="rollout chunk_tokens: must be >= 1"):
        SlotSampler(graphdef, config(), slots=2, chunk_tokens=0)
    from rlmt_jax.settings.config import resolve
    with pytest.raises(UserError, match="rollout.slots"):
        resolve(None, ["rollout.slots=0"])
    with pytest.raises(UserError, match="rollout.engine"):
        resolve(None, ["rollout.engine=paged"])


@pytest.mark.parametrize("prompt, tokens_so_far, window", [
    (16, 0, 1), (16, 1, 1), (15, 0, 0), (15, 1, 0), (15, 2, 1), (16, 4, 1), (16, 5, 2), (16, 12, 2)])
def test_a_chunk_attends_to_the_first_window_that_holds_its_rows_next_slots(prompt, tokens_so_far, window):
    # 13 new tokens in 3 windows: blocks of 16 + 4, 4 and 4 slots (ends 20, 24, 28); a chunk of 5 steps from
    # slot prompt + tokens - 1 writes up to slot prompt + tokens + 3, which its window must hold (0 tokens: just
    # admitted, its first token chosen); past the last window, the last
    cfg = models.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
    graphdef, _ = nnx.split(models.build_model(cfg, nnx.Rngs(0)))
    engine = SlotSampler(graphdef, config(max_new_tokens=13, decode_windows=3), slots=2, chunk_tokens=5)
    engine.model_config = cfg
    batch = engine._batch([[1] * prompt, [2] * 3], jax.random.key(0))
    batch.out.counts[:] = [tokens_so_far, 1]
    assert engine._window(16, [batch], np.asarray([0, 1]), np.asarray([0, 0])) == window


NEXT_PROMPTS = [[9, 9, 100], [33, 44, 55, 66, 77], [120], [6, 7, 8, 9, 10, 11, 12, 13]]


def two_steps(path, next_params_of, slots=3, carried_cache="recompute"):
    """Step A's call starting step B's rows in its tail (max_staleness 1), then step B's call with the params
    `next_params_of(params)` (the update between them).  -> (A, B, params, B's params, graphdef, config)"""
    graphdef, params = _loaded(path, False)
    cfg = config(n=3, temperature=1.0, max_new_tokens=14)
    engine = SlotSampler(graphdef, cfg, slots=slots, chunk_tokens=3, max_staleness=1, carried_cache=carried_cache)
    a = engine(params, MORE_PROMPTS, jax.random.key(1), version=0, ahead=[(NEXT_PROMPTS, jax.random.key(2))])
    carried = engine.carry_state()
    assert len(carried) == 1 and carried[0]["readmit"]  # rows of B were decoding when A's last row stopped
    later = next_params_of(params)
    b = engine(later, NEXT_PROMPTS, jax.random.key(2), version=1)
    return a, b, params, later, graphdef, cfg


def test_rows_started_ahead_with_unchanged_params_give_each_steps_static_rollout(llama):
    a, b, params, _, graphdef, cfg = two_steps(llama[0], lambda p: p)
    static = Sampler(graphdef, cfg)
    assert_same_rollout(static(params, MORE_PROMPTS, jax.random.key(1)), a)
    assert_same_rollout(static(params, NEXT_PROMPTS, jax.random.key(2)), b)  # carried rows' caches recomputed
    versions = b.versions[b.response_mask]
    assert set(np.unique(versions).tolist()) == {0, 1}  # some of B's tokens were chosen during A
    assert np.all(a.versions[a.response_mask] == 0) and np.all(b.versions[~b.response_mask] == -1)


def test_behaviour_logprobs_are_the_recorded_versions_teacher_forced_forward(llama):
    a, b, params, later, graphdef, _ = two_steps(llama[0], lambda p: jax.tree.map(lambda x: x * 1.05, p))
    mask = b.response_mask
    assert np.all(b.versions[mask] >= 0) and np.all(b.versions[mask] <= 1)  # none older than one version
    forwards = []
    for weights in (params, later):
        model = nnx.merge(graphdef, weights)
        logits = model(jnp.asarray(b.tokens), jnp.asarray(b.attention_mask), b.positions)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        forward = jnp.take_along_axis(logp, jnp.asarray(b.tokens)[:, 1:, None], axis=-1)[..., 0]
        forwards.append(np.pad(np.asarray(forward), ((0, 0), (1, 0))))
    behaviour = np.where(b.versions == 0, forwards[0], forwards[1])
    np.testing.assert_allclose(b.logprobs[mask], behaviour[mask], atol=1e-5)
    stale = mask & (b.versions == 0)
    assert stale.sum() > 3 and np.abs(forwards[1] - forwards[0])[stale].min() > 1e-4  # the versions differ there


def test_carried_rows_that_keep_their_cache_decode_on_with_the_new_params(llama, monkeypatch):
    # carried_cache keep: no recompute; with unchanged params the rollouts are the static ones, and after an
    # update the carried rows' later tokens attend to keys and values of the old params, so their recorded
    # log-probs are not the new version's teacher-forced ones, while rows started in B's call are
    readmitted = []
    monkeypatch.setattr(SlotSampler, "_readmit", lambda self, *args: readmitted.append(args) or args[1])
    a, b, params, _, graphdef, cfg = two_steps(llama[0], lambda p: p, carried_cache="keep")
    static = Sampler(graphdef, cfg)
    assert_same_rollout(static(params, MORE_PROMPTS, jax.random.key(1)), a)
    assert_same_rollout(static(params, NEXT_PROMPTS, jax.random.key(2)), b)
    assert [args[3] for args in readmitted] == [0, 1]  # A's call, its 2 batches, nothing to readmit; B's none
    _, b, _, later, graphdef, _ = two_steps(llama[0], lambda p: jax.tree.map(lambda x: x * 1.05, p),
                                            carried_cache="keep")
    model = nnx.merge(graphdef, later)
    logits = model(jnp.asarray(b.tokens), jnp.asarray(b.attention_mask), b.positions)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    forward = np.pad(np.asarray(jnp.take_along_axis(logp, jnp.asarray(b.tokens)[:, 1:, None], axis=-1)[..., 0]),
                     ((0, 0), (1, 0)))
    mask = np.asarray(b.response_mask)
    carried = (np.asarray(b.versions) == 0).any(axis=1)  # rows started during A
    newer = mask & (np.asarray(b.versions) == 1)
    np.testing.assert_allclose(b.logprobs[newer & ~carried[:, None]], forward[newer & ~carried[:, None]], atol=1e-5)
    assert np.abs(b.logprobs - forward)[newer & carried[:, None]].max() > 1e-3


def test_rows_started_two_steps_ahead_finish_in_their_own_step(llama):
    # max_staleness 2: A's tail starts B's 3 rows, then C's; B's call takes back A's rows of B and of C and starts
    # more of C's. Every call gives its static rollout (same rows, keys and streams), and no token is older
    # than its step's version - 2; some of C's were chosen during A.
    graphdef, params = _loaded(llama[0], False)
    cfg = config(n=3, temperature=1.0, max_new_tokens=14)
    engine = SlotSampler(graphdef, cfg, slots=5, chunk_tokens=2, max_staleness=2)
    b_prompts, keys = [[120, 4]], [jax.random.key(i) for i in (1, 2, 3)]
    a = engine(params, MORE_PROMPTS, keys[0], version=0, ahead=[(b_prompts, keys[1]), (NEXT_PROMPTS, keys[2])])
    carried = engine.carry_state()
    assert len(carried) == 2 and any(carried[1]["counts"])  # C's rows started during A
    b = engine(params, b_prompts, keys[1], version=1, ahead=[(NEXT_PROMPTS, keys[2])])
    c = engine(params, NEXT_PROMPTS, keys[2], version=2)
    static = Sampler(graphdef, cfg)
    for rollout, prompts, key in ((a, MORE_PROMPTS, keys[0]), (b, b_prompts, keys[1]), (c, NEXT_PROMPTS, keys[2])):
        assert_same_rollout(static(params, prompts, key), rollout)
    assert set(np.unique(c.versions[c.response_mask]).tolist()) >= {0, 2}
    assert np.all(b.versions[b.response_mask] >= 0) and np.all(a.versions[a.response_mask] == 0)
    assert engine.carry_state() == []


def test_rows_started_ahead_get_the_keys_their_steps_sample_with():
    # the stage hands the sampler, for each step ahead, the key that step's own call will split off
    from rlmt_jax.rollout.stage import RolloutStage
    from rlmt_jax.settings.config import RolloutConfig

    calls = []
    recorder = lambda params, prompts, key, version=0, ahead=(): calls.append((prompts, key, list(ahead)))  # noqa: E731
    stage = RolloutStage(None, recorder, None, RolloutConfig(engine="slots", max_staleness=2), None)
    steps, key = [[[1]], [[2]], [[3]]], jax.random.key(0)
    for step in range(3):
        _, key = stage.sample(None, key, steps[step], step, steps[step + 1:])
    data = lambda k: np.asarray(jax.random.key_data(k)).tolist()  # noqa: E731
    (_, k0, ahead0), (_, k1, ahead1), (_, k2, ahead2) = calls
    assert [p for p, _ in ahead0] == steps[1:] and [data(k) for _, k in ahead0] == [data(k1), data(k2)]
    assert [data(k) for _, k in ahead1] == [data(k2)] and ahead2 == []
    assert len({str(data(k)) for k in (k0, k1, k2)}) == 3


def test_rows_started_for_other_prompts_are_sampled_again(llama, caplog):
    graphdef, params = _loaded(llama[0], False)
    cfg = config(n=3, temperature=1.0, max_new_tokens=14)
    engine = SlotSampler(graphdef, cfg, slots=3, chunk_tokens=3, max_staleness=1)
    engine(params, MORE_PROMPTS, jax.random.key(1), ahead=[(NEXT_PROMPTS, jax.random.key(2))])
    with caplog.at_level("WARNING"):
        b = engine(params, NEXT_PROMPTS, jax.random.key(3), version=1)  # another key than the rows started with
    assert "sampled again" in caplog.text
    assert_same_rollout(Sampler(graphdef, cfg)(params, NEXT_PROMPTS, jax.random.key(3)), b)
    assert np.all(b.versions[b.response_mask] == 1)
    with pytest.raises(UserError, match="max_staleness"):
        SlotSampler(graphdef, cfg, slots=3)(params, PROMPTS, jax.random.key(0), ahead=[(PROMPTS, jax.random.key(1))])


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_staleness=-1"], "rollout.max_staleness.*must be an int >= 0"),
    (["rollout.carried_cache=keep"], "rollout.carried_cache.*needs rollout.max_staleness >= 1"),
    (["rollout.max_staleness=1", "algorithm.rollout_correction.weights=token"], "rollout.max_staleness.*needs rollout.engine=slots"),
    (["rollout.max_staleness=1", "rollout.engine=slots"], "rollout.max_staleness.*needs a rollout correction"),
    (["rollout.max_staleness=1", "rollout.engine=slots", "algorithm.rollout_correction.weights=token",
      "rollout.group_filter=varied"], "rollout.max_staleness.*without rollout.group_filter"),
])
def test_partial_rollout_settings_name_what_they_need(overrides, message):
    from rlmt_jax.settings.config import resolve
    with pytest.raises(UserError, match=message):
        resolve(None, overrides)


def test_a_row_started_ahead_that_stops_at_its_first_token_is_not_carried_on(llama):
    # the next step's rows all stop at their first token (greedy: each prompt's first token is known), so the rows
    # its last admission starts have stopped before any chunk runs: they are done, not carried
    graphdef, params = _loaded(llama[0], False)
    greedy = config(n=3, temperature=0.0, max_new_tokens=14, eos_ids=())
    firsts = Sampler(graphdef, greedy)(params, NEXT_PROMPTS, jax.random.key(2)).tokens[:, 16]
    cfg = config(n=3, temperature=0.0, max_new_tokens=14, eos_ids=tuple(sorted({int(t) for t in firsts})))
    engine = SlotSampler(graphdef, cfg, slots=3, chunk_tokens=3, max_staleness=1)
    a = engine(params, MORE_PROMPTS, jax.random.key(1), version=0, ahead=[(NEXT_PROMPTS, jax.random.key(2))])
    (carried,) = engine.carry_state()
    assert not carried["readmit"] and any(carried["done"])  # done early, nothing to resume
    engine.restore_carry(json.loads(json.dumps(carried)))  # as a checkpoint of one carried step saved it
    assert engine.carry_state() == [carried]
    b = engine(params, NEXT_PROMPTS, jax.random.key(2), version=1)
    static = Sampler(graphdef, cfg)
    assert_same_rollout(static(params, MORE_PROMPTS, jax.random.key(1)), a)
    assert_same_rollout(static(params, NEXT_PROMPTS, jax.random.key(2)), b)
    assert np.all(np.asarray(b.response_lengths) == 1)


def test_the_tail_packs_into_fewer_slots_and_every_row_keeps_its_tokens(llama, monkeypatch):
    # 12 rows through 8 slots: once none waits, the rows still decoding move into 2 slots (then 1 when they
    # fit), the chunks run on those; every row must still come out with its own tokens, in its own place
    graphdef, params = _loaded(llama[0], False)
    cfg = config(n=3, temperature=1.0, max_new_tokens=24)
    engine = SlotSampler(graphdef, cfg, slots=8, chunk_tokens=2)
    sizes, chunk_slots = [], []
    pack = SlotSampler._pack_tail

    def recorded(self, state, slot_row, slot_batch):
        state, after, batch = pack(self, state, slot_row, slot_batch)
        sizes.append((len(slot_row), len(after), int((after >= 0).sum()), int(np.asarray(state.active).sum())))
        chunk_slots.append(state.last.shape[0])
        return state, after, batch

    monkeypatch.setattr(SlotSampler, "_pack_tail", recorded)
    key = jax.random.key(7)
    rollout = engine(params, MORE_PROMPTS, key)
    assert_same_rollout(Sampler(graphdef, cfg)(params, MORE_PROMPTS, key), rollout)
    packed = [(before, after, held, active) for before, after, held, active in sizes if after < before]
    assert packed, sizes
    for before, after, held, active in packed:  # a quarter or less, holding exactly the rows still decoding
        assert after * 4 <= before and held == active
    assert min(chunk_slots) < 8 and engine.compiled_programs() > 0
