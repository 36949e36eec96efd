"""Rollouts: a batch of prompts -> `n` sampled responses each, with the log-probs the RL losses need.

Two jitted programs per (number of prompts, prompt bucket):
- prefill: runs every prompt once, copies its KV cache to its `n` samples and chooses their first tokens;
- decode: a `lax.while_loop` that feeds one token per row per step into the (donated) cache and stops when
  every row has produced an EOS or `max_new_tokens` are out.
Weights come in as an argument (the state half of `nnx.split`) and are merged inside, so a new policy
never recompiles. Prompts are left-padded to the smallest bucket length that holds the longest of them.

Layout of a Rollout (R = prompts * n rows, grouped: row r is sample r % n of prompt r // n;
P = the bucket's prompt length, N = max_new_tokens):
    columns 0 .. P-1       the prompt, left-padded
    columns P .. P+N-1     the response, right-padded after its stop (EOS included in the response)
A teacher-forced forward over `tokens` with `attention_mask` and `positions` (= cumsum(mask) - 1) sees the
same sequences at the same positions as the sampler did, and its log-probs at `response_mask` equal
`logprobs` (position t holds the log-prob of token t, predicted from the tokens before it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.attention import decode_slot_multiple, key_cache_layout
from models.layers import CacheBlocks
from models.sharding import constrain
from models.transformer import KVCache
from rlmt_jax.scale import mesh as mesh_lib
from rlmt_jax.core.errors import UserError
from rlmt_jax.scale.multihost import HostRows
from rlmt_jax.rollout.next_token import choose_next_token

STOP_EOS = 0  # the row produced one of the EOS ids (kept as its last response token)
STOP_LENGTH = 1  # the row reached max_new_tokens without one
STOP_REASONS = ("eos", "length")
CACHE_DTYPES = ("float32", "bfloat16")
# The automatic decode windows (SamplingConfig.decode_windows): 4 windows cut a step's average cache reads to
# ~5/8 of the response slots (8 would give ~9/16), for 4 copies of the loop body in the program; responses
# shorter than MIN_TOKENS_FOR_WINDOWS keep one window (little to save, and a smaller program to compile).
AUTO_DECODE_WINDOWS = 4
MIN_TOKENS_FOR_WINDOWS = 128
# Logical axes of the KV cache the sampler keeps (keys transposed; heads-major like the values for the decode
# kernel, see cache_axes): read by the memory plan too.
KEY_CACHE_AXES = (None, "batch", "kv_heads", "head_dim", "cache_seq")
VALUE_CACHE_AXES = (None, "batch", "kv_heads", "cache_seq", "head_dim")


def default_prompt_buckets(limit: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below `limit`, then `limit`: e.g. 1024 -> (16, 32, ..., 512, 1024)."""
    buckets = []
    length = smallest
    while length < limit:
        buckets.append(length)
        length *= 2
    return (*buckets, limit)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable: it is compiled into the programs (a change recompiles them).

    temperature 0 is greedy decoding (top_k/top_p unused; log-probs then come from the raw logits).
    eos_ids: tokens that end a response (empty: every row runs max_new_tokens).
    pad_id: the token written in the padding of `tokens` (masked everywhere, any id in the vocabulary).
    prompt_buckets: the padded prompt lengths that get a program; a prompt longer than the last is an error.
    decode_windows: into how many windows the decode loop splits the response (None: AUTO_DECODE_WINDOWS when
        max_new_tokens >= MIN_TOKENS_FOR_WINDOWS, else 1). The cache is then as many blocks, each its own
        buffer (the first also holds the prompt), and while the loop fills block j its attention reads
        blocks 0..j only, not the whole cache: with 4 windows a step reads on average the prompt and ~5/8 of
        the response slots instead of all of them (most of a step's memory traffic for long responses at
        scale). Each window is its own loop in the one decode program. With the GPU decode kernel the blocks
        end at multiples of 16 slots (cache_block_widths).
    """

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    prompt_buckets: tuple[int, ...] = default_prompt_buckets(1024)
    cache_dtype: str = "float32"
    decode_windows: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or None (off), got {self.top_k}")
        buckets = self.prompt_buckets
        _check(len(buckets) > 0 and all(b >= 1 for b in buckets), "prompt_buckets",
               f"must hold positive lengths, got {buckets}")
        _check(list(buckets) == sorted(set(buckets)), "prompt_buckets", f"must be strictly increasing, got {buckets}")
        _check(self.cache_dtype in CACHE_DTYPES, "cache_dtype",
               f"must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        _check(self.decode_windows is None or self.decode_windows >= 1, "decode_windows",
               f"must be >= 1 or None (automatic), got {self.decode_windows}")

    @property
    def windows(self) -> int:
        """decode_windows, or its automatic value."""
        if self.decode_windows is not None:
            return self.decode_windows
        return AUTO_DECODE_WINDOWS if self.max_new_tokens >= MIN_TOKENS_FOR_WINDOWS else 1

    def response_blocks(self) -> tuple[int, ...]:
        """Response slots each decode window fills (cache block j holds window j's, block 0 the prompt's
        too): max_new_tokens - 1 slots (the last token is never fed back) split into `windows` parts of
        ceil(slots / windows), the last one shorter; fewer when there are fewer slots; () when there is none."""
        slots = self.max_new_tokens - 1
        width = max(-(-slots // self.windows), 1)
        return tuple(min(width, slots - start) for start in range(0, slots, width))


def cache_axes(model_config) -> tuple[tuple, tuple]:
    """The logical axes of the sampler's key and value caches for a model config (its key layout)."""
    heads_major = key_cache_layout(model_config) == "bnsk"
    return (VALUE_CACHE_AXES if heads_major else KEY_CACHE_AXES), VALUE_CACHE_AXES


def cache_block_widths(config: SamplingConfig, prompt_len: int, multiple: int = 1) -> tuple[int, ...]:
    """Slots of each cache block: the first holds the prompt and window 0's response slots, each later one its
    window's (config.response_blocks()). With `multiple` > 1 (the decode kernel's, models.attention
    .decode_slot_multiple) every block ends at a multiple of it: a window then fills up to its rounded end
    (the next starts there), and the last block may hold up to multiple - 1 slots that are never written."""
    ends, end = [], prompt_len
    for width in config.response_blocks() or (0,):
        end += width
        rounded = -(-end // multiple) * multiple
        if not ends or rounded > ends[-1]:
            ends.append(rounded)
    return tuple(stop - start for start, stop in zip((0, *ends[:-1]), ends))


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise UserError(f"sampling {field}: {message}")


class Rollout(NamedTuple):
    """Sampled sequences, R = prompts * n rows, T = prompt_len + max_new_tokens columns (layout above).

    tokens: [R, T] int32; prompt_mask, response_mask: [R, T] bool; logprobs: [R, T] float32, the log-prob of
    token t under softmax(logits / temperature) at response positions, 0 elsewhere; prompt_lengths,
    response_lengths: [R] int32 (the response counts its EOS); stop_reason: [R] int32, STOP_EOS or STOP_LENGTH.
    """

    tokens: jax.Array
    prompt_mask: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    prompt_lengths: jax.Array
    response_lengths: jax.Array
    stop_reason: jax.Array
    prompt_len: int  # P: the bucket length; the response starts at this column
    group_size: int  # n

    @property
    def attention_mask(self) -> jax.Array:
        """prompt_mask | response_mask: [R, T] bool."""
        return self.prompt_mask | self.response_mask

    @property
    def positions(self) -> jax.Array:
        """clip(cumsum(attention_mask) - 1, 0): the positions the sampler used.  [R, T] int32."""
        return token_positions(self.attention_mask)

    def response_tokens(self, row: int) -> list[int]:
        """The response of one row as a list of ids (EOS included when it stopped on one)."""
        length = int(self.response_lengths[row])
        return [int(t) for t in np.asarray(self.tokens[row, self.prompt_len:self.prompt_len + length])]


def token_positions(mask: jax.Array) -> jax.Array:
    """Position of each token among the real ones of its row: clip(cumsum(mask) - 1, 0).  [B, T] -> [B, T]."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds a prompt of `longest` tokens."""
    for length in buckets:
        if longest <= length:
            return length
    raise UserError(
        f"sampling prompt_buckets: a prompt of {longest} tokens is longer than the largest bucket {buckets[-1]}; "
        "truncate prompts to the limit (data.max_prompt_tokens) or raise it"
    )


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in `length` columns.  -> (ids [B, length] int32, mask [B, length] bool)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt):] = np.asarray(prompt, np.int32)
            mask[row, length - len(prompt):] = True
    return ids, mask


def _last_logits(model, input_ids, positions, mask, cache, index, rope=None, head=None,
                 decode_step=False) -> tuple[jax.Array, KVCache]:
    """model.decode with the lm head applied to the last column only.  -> (logits [batch, vocab], cache).

    head: the lm head as [vocab, embed] (`vocab_major_head`), or None for the model's own.
    decode_step: a step of the decode loop, whose rows' valid slots are each one run (decode_hidden_states'
    contiguous_rows): a prompt left-padded to slot P - 1 by `left_pad`, a row's n samples copying its slots,
    then every step writing its slot with mask True for every row (stopped rows too, fed pads that nothing
    reads); a window's view is a prefix of them."""
    hidden, cache = model.decode_hidden_states(input_ids, positions, mask, cache, index, rope,
                                               contiguous_rows=decode_step)
    if head is None:
        return model.lm_logits(hidden[:, -1:])[:, 0], cache
    logits = jnp.einsum("bd,vd->bv", hidden[:, -1], head)
    return constrain(logits, ("batch", "vocab")), cache


def vocab_major_head(model) -> jax.Array:
    """The lm head as [vocab, embed] in the compute dtype (the embedding table itself when tied). Laid out
    once before the decode loop: each step's [rows, embed] x [embed, vocab] product then reads the weights
    row by row, contiguously, which XLA:CPU streams faster than the [embed, vocab] layout."""
    return constrain(model.lm_head_weight().T, ("vocab", "embed"))


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Where a sampler runs and in what dtype: a rollout mesh (mesh.rollout_mesh), the rules that place the
    policy's copy and the activations on it (mesh.ROLLOUT_RULES), and the copy's dtype (the compute dtype).

        layout = DecodeLayout.of(training_mesh, cfg.rollout.mesh, cfg.runtime.dtype)
    """

    mesh: Mesh
    dtype: str
    rules: Mapping = dataclasses.field(default_factory=lambda: mesh_lib.ROLLOUT_RULES)

    @classmethod
    def of(cls, mesh: Mesh, config, dtype: str) -> DecodeLayout:
        """The layout of `config` (a config.RolloutMeshConfig) over the devices of the training `mesh`."""
        return cls(mesh_lib.rollout_mesh(mesh, config), dtype)

    def copier(self, params: nnx.State):
        """A jitted fn(params) -> the params cast to `dtype` and placed by the rules on the rollout mesh: one
        program that moves every weight once (their float32 shards in, whole bfloat16 copies or tensor slices
        out; the params may sit on any mesh over the same devices in the same order)."""
        shardings = mesh_lib.param_shardings(params, self.mesh, self.rules)
        whole = NamedSharding(self.mesh, PartitionSpec())
        dtype = jnp.dtype(self.dtype)

        def cast_and_gather(x):
            # cast the shard first (half the bytes to move in bfloat16), then gather it whole; the tensor split,
            # if any, is then a local slice. Straight from FSDP to a tensor split of another device grouping, XLA
            # would replicate the float32 tensor instead ("involuntary full rematerialization").
            return jax.lax.with_sharding_constraint(x.astype(dtype), whole)

        return jax.jit(lambda p: jax.tree.map(cast_and_gather, p), out_shardings=shardings)


class _DecodeState(NamedTuple):
    step: jax.Array  # the response token being chosen (0 is chosen by prefill)
    cache: KVCache
    last: jax.Array  # [R] the token chosen at step - 1
    positions: jax.Array  # [R] its position
    done: jax.Array  # [R] bool: an EOS has been chosen
    lengths: jax.Array  # [R] response tokens so far (EOS included)
    tokens: jax.Array  # [R, N]
    logprobs: jax.Array  # [R, N]


class Sampler:
    """Samples `config.n` responses per prompt from a CausalLM given as (graphdef, params).

        graphdef, params = nnx.split(model)
        sampler = Sampler(graphdef, SamplingConfig(n=8, max_new_tokens=4096, temperature=0.7, eos_ids=(...)))
        rollout = sampler(params, prompts, jax.random.key(0))   # prompts: list of token-id lists
    """

    def __init__(self, graphdef: nnx.GraphDef, config: SamplingConfig, hosts=None, layout: DecodeLayout | None = None):
        """hosts: a `multihost.HostRows` to sample on a mesh: each process passes its own prompts, the bucket
        fits the longest prompt of all processes, the programs run on global arrays split over the batch
        axes, and the Rollout holds this process's rows (numpy). None: one device, arrays as given.

        layout: sample in a decode layout: every call first copies the params it is given into the layout
        (cast and resharded once), runs both programs on that copy under the layout's rules (rows split over
        its batch axes, HostRows of its mesh; `hosts` is then not used) and drops the copy before returning.
        None: the params are used where they are, under the caller's activation rules."""
        self.graphdef = graphdef
        self.config = config
        self.layout = layout
        self.hosts = hosts if layout is None else HostRows(layout.mesh)
        self._copy = None  # the layout's copier, made at the first call (it needs the params' tree)
        self._copy_needed = True
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

    @classmethod
    def for_model(cls, model: nnx.Module, config: SamplingConfig) -> tuple[Sampler, nnx.State]:
        """A sampler for `model` and the params to call it with."""
        graphdef, params = nnx.split(model)
        return cls(graphdef, config), params

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array) -> Rollout:
        """prompts: token-id lists (at least one token each, any lengths up to the largest bucket)."""
        ids, mask, count = self._padded(prompts)
        with self._in_layout():
            params = self.rollout_params(params)  # the layout's copy lives until this block ends
            cache, first, first_logprobs, positions = self._prefill(params, ids, mask, key)
            arrays, _ = self._decode(params, cache, first, first_logprobs, positions, ids, mask, key)
            del params, cache
        if self.hosts is not None:
            arrays = tuple(rows[: count * self.config.n] for rows in self.hosts.take(arrays))
        return Rollout(*arrays, prompt_len=ids.shape[1], group_size=self.config.n)

    def compiled_decode_text(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: jax.Array) -> str:
        """The optimised HLO of the decode program for these prompts (runs the prefill, not the decode): what
        its loop moves between devices per generated token can be read from it (collectives in the while body)."""
        ids, mask, _ = self._padded(prompts)
        with self._in_layout():
            params = self.rollout_params(params)
            cache, first, first_logprobs, positions = self._prefill(params, ids, mask, key)
            lowered = self._decode.lower(params, cache, first, first_logprobs, positions, ids, mask, key)
            return lowered.compile().as_text()

    def _padded(self, prompts: Sequence[Sequence[int]]) -> tuple[jax.Array, jax.Array, int]:
        """(ids, mask) [B, bucket] of the prompts, left-padded (global arrays on a mesh: every process's prompts,
        with filler copies so the rows split), and this process's number of prompts."""
        if not prompts:
            raise UserError("sampling: no prompts given")
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise UserError(f"sampling: prompt {row} is empty (a prompt needs at least one token)")
        longest, count = max(len(p) for p in prompts), len(prompts)
        if self.hosts is not None:
            # every process runs the same programs: the same bucket and the same number of prompts
            agreed = self.hosts.gather(np.asarray([longest, count], np.int64))
            if len(set(agreed[:, 1].tolist())) > 1:
                raise ValueError(f"sampling: the processes passed different numbers of prompts {agreed[:, 1]}")
            longest = int(agreed[:, 0].max())
            # filler prompts (copies of the last; their rows are dropped) make the rows split over the mesh
            prompts = [*prompts, *[prompts[-1]] * (-count % self.hosts.rows_multiple)]
        length = bucket_length(longest, self.config.prompt_buckets)
        ids, mask = left_pad(prompts, length, self.config.pad_id)
        ids, mask = (jnp.asarray(ids), jnp.asarray(mask)) if self.hosts is None else self.hosts.put((ids, mask))
        return ids, mask, count

    def rollout_params(self, params: nnx.State) -> nnx.State:
        """`params` as the programs take them: the layout's copy (a new copy at every call), or as given."""
        if self.layout is None:
            return params
        if self._copy is None:
            self._copy = self.layout.copier(params)
            targets = jax.tree.leaves(mesh_lib.param_shardings(params, self.layout.mesh, self.layout.rules))
            self._copy_needed = not all(  # already in the layout (one device, float32): nothing to copy
                x.dtype == jnp.dtype(self.layout.dtype) and x.sharding.is_equivalent_to(target, x.ndim)
                for x, target in zip(jax.tree.leaves(params), targets, strict=True))
        return self._copy(params) if self._copy_needed else params

    def _in_layout(self):
        """The layout's activation rules (models.sharding.constrain), or the caller's when there is no layout."""
        if self.layout is None:
            return contextlib.nullcontext()
        return mesh_lib.activation_sharding(self.layout.mesh, self.layout.rules)

    def compiled_programs(self) -> int:
        """How many programs prefill and decode have compiled so far (one each per prompt count and bucket)."""
        return self._prefill._cache_size() + self._decode._cache_size()

    # ------------------------------------------------------------------ the two programs
    def _prefill_fn(self, params, prompt_ids, prompt_mask, key):
        """prompt_ids, prompt_mask: [B, P] -> (cache for R = B * n rows of P + N - 1 slots with the prompts in
        slots 0..P-1, first tokens [R], their log-probs [R], their positions [R])."""
        cfg = self.config
        model = nnx.merge(self.graphdef, params)
        batch, prompt_len = prompt_ids.shape
        positions = token_positions(prompt_mask)
        cache = model.init_cache(batch, prompt_len, jnp.dtype(cfg.cache_dtype))
        last_logits, cache = _last_logits(model, prompt_ids, positions, prompt_mask, cache, 0)

        widths = cache_block_widths(cfg, prompt_len, decode_slot_multiple(model.config))
        valid = jnp.pad(jnp.repeat(cache.valid, cfg.n, axis=0), ((0, 0), (0, sum(widths) - prompt_len)))
        key_axes, value_axes = cache_axes(model.config)
        cache = KVCache(k=_blocked(cache.k, key_axes, cfg, widths), v=_blocked(cache.v, value_axes, cfg, widths),
                        valid=valid)
        if not model.config.scan_layers:  # each layer's blocks their own buffers: no slicing in the decode loop
            cache = cache._replace(k=_per_layer_blocks(cache.k), v=_per_layer_blocks(cache.v))

        logits = jnp.repeat(last_logits, cfg.n, axis=0)
        tokens, logprobs = choose_next_token(
            logits, self._uniform(key, 0, logits.shape[0]), cfg.temperature, cfg.top_k, cfg.top_p
        )
        first_positions = jnp.repeat(positions[:, -1] + 1, cfg.n, axis=0)
        return cache, tokens, logprobs, first_positions

    def _decode_fn(self, params, cache, first, first_logprobs, first_positions, prompt_ids, prompt_mask, key):
        cfg = self.config
        model = nnx.merge(self.graphdef, params)
        rows = first.shape[0]
        prompt_len = prompt_ids.shape[1]
        new = cfg.max_new_tokens
        # Rotary tables of every position the loop feeds, computed once: [rows, new, head_dim] each.
        fed_positions = first_positions[:, None] + jnp.arange(new, dtype=jnp.int32)[None, :]
        rope_cos, rope_sin = model.rotary_tables(fed_positions)
        head = vocab_major_head(model)
        eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

        def is_eos(tokens):
            return jnp.any(tokens[:, None] == eos[None, :], axis=-1)

        state = _DecodeState(
            step=jnp.int32(1),
            cache=cache,
            last=first,
            positions=first_positions,
            done=is_eos(first),
            lengths=jnp.ones((rows,), jnp.int32),
            tokens=jnp.full((rows, new), cfg.pad_id, jnp.int32).at[:, 0].set(first),
            logprobs=jnp.zeros((rows, new), jnp.float32).at[:, 0].set(first_logprobs),
        )

        def unfinished(s: _DecodeState):
            return (s.step < new) & ~jnp.all(s.done)

        def advance(s: _DecodeState) -> _DecodeState:
            slot = prompt_len + s.step - 1
            feed_mask = jnp.ones((rows, 1), bool)
            rope = tuple(jax.lax.dynamic_slice_in_dim(t, s.step - 1, 1, axis=1) for t in (rope_cos, rope_sin))
            logits, cache = _last_logits(model, s.last[:, None], s.positions[:, None], feed_mask, s.cache, slot, rope,
                                         head, decode_step=True)
            tokens, logprobs = choose_next_token(
                logits, self._uniform(key, s.step, rows), cfg.temperature, cfg.top_k, cfg.top_p
            )
            tokens = jnp.where(s.done, cfg.pad_id, tokens)
            logprobs = jnp.where(s.done, 0.0, logprobs)
            column = (0, s.step)
            return _DecodeState(
                step=s.step + 1,
                cache=cache,
                last=tokens,
                positions=s.positions + 1,
                done=s.done | is_eos(tokens),
                lengths=s.lengths + (~s.done).astype(jnp.int32),
                tokens=jax.lax.dynamic_update_slice(s.tokens, tokens[:, None], column),
                logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprobs[:, None], column),
            )

        # Window j feeds the tokens written to cache block j (its response slots) and attends to blocks 0..j
        # only. A window whose rows are all done runs no step.
        s, attended = state, 0
        widths = cache_block_widths(cfg, prompt_len, decode_slot_multiple(model.config))
        for j, width in enumerate(widths if cfg.response_blocks() else ()):
            attended += width
            full = s.cache
            view = KVCache(k=_first_blocks(full.k, j + 1), v=_first_blocks(full.v, j + 1),
                           valid=full.valid[:, :attended])
            last_step = attended - prompt_len  # steps 1.. feed slot prompt_len + step - 1
            s = jax.lax.while_loop(lambda s, last_step=last_step: unfinished(s) & (s.step <= last_step),
                                   advance, s._replace(cache=view))
            s = s._replace(cache=KVCache(
                k=_with_first_blocks(full.k, s.cache.k), v=_with_first_blocks(full.v, s.cache.v),
                valid=full.valid.at[:, :attended].set(s.cache.valid)))

        prompt_ids = jnp.repeat(prompt_ids, cfg.n, axis=0)
        prompt_mask = jnp.repeat(prompt_mask, cfg.n, axis=0)
        response_mask = jnp.arange(new, dtype=jnp.int32)[None, :] < s.lengths[:, None]
        no_prompt = jnp.zeros_like(prompt_mask)
        return (
            jnp.concatenate([prompt_ids, s.tokens], axis=1),
            jnp.concatenate([prompt_mask, jnp.zeros_like(response_mask)], axis=1),
            jnp.concatenate([no_prompt, response_mask], axis=1),
            jnp.concatenate([jnp.zeros(prompt_mask.shape, jnp.float32), s.logprobs], axis=1),
            jnp.sum(prompt_mask, axis=1, dtype=jnp.int32),
            s.lengths,
            jnp.where(s.done, STOP_EOS, STOP_LENGTH).astype(jnp.int32),
        ), s.cache  # returned only so that the donated cache is updated in place (the caller drops it)

    @staticmethod
    def _uniform(key: jax.Array, step, rows: int) -> jax.Array:
        """One uniform in [0, 1) per row for response token `step`.  -> [rows]"""
        return jax.random.uniform(jax.random.fold_in(key, step), (rows,))


def _blocked(prompt_cache: jax.Array, axes: tuple, cfg: SamplingConfig, widths: tuple[int, ...]) -> CacheBlocks:
    """The prefilled cache [layers, prompts, ...] given to its n samples, as one block per decode window of
    `widths` slots (cache_block_widths): the prompt's slots and the first window's, then each later window's,
    empty."""
    slot_axis = axes.index("cache_seq")
    first = jnp.repeat(prompt_cache, cfg.n, axis=1)
    pad = [(0, widths[0] - first.shape[slot_axis]) if axis == slot_axis else (0, 0) for axis in range(first.ndim)]
    blocks = [jnp.pad(first, pad)]
    for width in widths[1:]:
        blocks.append(jnp.zeros(first.shape[:slot_axis] + (width,) + first.shape[slot_axis + 1:], first.dtype))
    return CacheBlocks(constrain(block, axes) for block in blocks)


def _per_layer_blocks(blocks: CacheBlocks) -> tuple[CacheBlocks, ...]:
    """Stacked blocks [layers, ...] -> per layer, that layer's blocks (for models whose layers are not scanned)."""
    layers = blocks.blocks[0].shape[0]
    return tuple(CacheBlocks(block[layer] for block in blocks.blocks) for layer in range(layers))


def _first_blocks(cache, count: int):
    """The first `count` blocks of a blocked cache (CacheBlocks, or a tuple of them per layer)."""
    if isinstance(cache, CacheBlocks):
        return CacheBlocks(cache.blocks[:count])
    return tuple(CacheBlocks(layer.blocks[:count]) for layer in cache)


def _with_first_blocks(cache, first):
    """`cache` with its first blocks replaced by those of `first` (what _first_blocks took, updated)."""
    if isinstance(cache, CacheBlocks):
        return CacheBlocks((*first.blocks, *cache.blocks[len(first.blocks):]))
    return tuple(_with_first_blocks(layer, new) for layer, new in zip(cache, first))
