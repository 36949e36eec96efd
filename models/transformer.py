"""The decoder stack and its three heads: CausalLM (policy), RewardModel (sequence score), ValueModel (critic)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import (CacheRows, CausalTokens, decodes_slots_with_paged_kernel, decodes_with_kernel,
                              key_cache_layout, resolve_attention)
from models.config import ModelConfig
from models.layers import DecoderBlock, RMSNorm, _normal, rope_inverse_frequencies, rope_tables, write_rows
from models.sharding import constrain, param

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Decode state.  k: [layers, batch, kv_heads, head_dim, cache_len] (keys transposed), v: [layers, batch,
    kv_heads, cache_len, head_dim]: heads-major, so that attention is two plain matmuls per (row, kv head),
    q @ k and probs @ v. A model that decodes through the decode kernel keeps keys heads-major like values,
    [layers, batch, kv_heads, cache_len, head_dim] (models.attention.key_cache_layout).  valid: [batch,
    cache_len] (slot holds a real token).  Slots are filled left to right; a query at slot i attends to valid
    slots <= i.

    A model whose layers are not scanned also takes k and v as tuples of per-layer arrays (the same layouts
    without the layers axis): in a decode loop on CPU this saves copying each layer's slice out of the stacked
    array every step. Either array may also be a `CacheBlocks` of consecutive slots (each block its
    own buffer, cache_len their total): new tokens are written into its last block, and attention reads the
    blocks given only (how the sampler's decode windows read the filled part of the cache)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array


def default_positions(input_ids: jax.Array) -> jax.Array:
    """0..seq-1 for every row, as transformers uses when no position ids are given.  -> [batch, seq]"""
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


class Decoder(nnx.Module):
    """Embedding, `num_hidden_layers` blocks (a Python list, or stacked and scanned), final norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), pdt), ("vocab", "embed"))
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked_blocks(layer_rngs):
                return DecoderBlock(cfg, layer_rngs)

            self.layers = stacked_blocks(rngs)
            for _, variable in nnx.iter_graph(self.layers):
                if isinstance(variable, nnx.Param):
                    variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))
        else:
            self.layers = nnx.List([DecoderBlock(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        index: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """input_ids, positions: [batch, seq]; mask: [batch, seq, kv_len] (or the `CausalTokens` of a causal mask,
        for an attention kernel) -> (hidden [batch, seq, embed], cache).

        With a cache the new tokens' keys and values are written at slots index..index+seq-1 (kv_len = cache_len).
        rope: the (cos, sin) tables of `positions` if already computed (see `rotary_tables`).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        # Look up in a table split over vocab only: gathering from a table also split on embed (FSDP) makes
        # XLA rematerialise the whole table on every device ("Involuntary full rematerialization").
        # The cast first halves what is all-gathered in bfloat16 and does not change the values.
        table = constrain(self.embed[...].astype(dtype), ("vocab", "embed"))
        x = jnp.take(table, input_ids, axis=0)
        x = constrain(x, ("batch", "seq", "embed"))
        cos, sin = self.rotary_tables(positions) if rope is None else rope

        def block_forward(block_graphdef, block_state, h, layer_cache, layer_index):
            block = nnx.merge(block_graphdef, block_state)
            return block(h, cos, sin, mask, layer_cache, index, layer_index)

        if cfg.remat != "none":
            block_forward = jax.checkpoint(
                block_forward, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(0,)
            )

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            if cache is not None and isinstance(cache.k, (tuple, list)):
                raise ValueError("a model with scanned layers needs a stacked KVCache (k, v: [layers, ...])")

            def scan_body(carry, layer):
                h, kv = carry
                layer_state, layer_index = layer
                return block_forward(graphdef, layer_state, h, kv, layer_index), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            kv = None if cache is None else (cache.k, cache.v)
            (x, kv), _ = jax.lax.scan(scan_body, (x, kv), (state, layer_ids))
            if cache is not None:
                cache = cache._replace(k=kv[0], v=kv[1])
        else:
            per_layer = cache is not None and isinstance(cache.k, (tuple, list))
            kv = None if cache is None else (cache.k, cache.v)
            new_k, new_v = [], []
            for layer_index, block in enumerate(self.layers):
                graphdef, state = nnx.split(block)
                if per_layer:  # each layer's cache is its own buffer: nothing to slice out
                    x, (k, v) = block_forward(graphdef, state, x, (kv[0][layer_index], kv[1][layer_index]), None)
                    new_k.append(k)
                    new_v.append(v)
                else:
                    x, kv = block_forward(graphdef, state, x, kv, layer_index)
            if per_layer:
                cache = cache._replace(k=tuple(new_k), v=tuple(new_v))
            elif cache is not None:
                cache = cache._replace(k=kv[0], v=kv[1])
        x = self.final_norm(x)
        return x, cache

    def rotary_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin of rotary embedding at `positions` [batch, seq] -> each [batch, seq, head_dim]."""
        cfg = self.config
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return rope_tables(positions, inv_freq, jnp.dtype(cfg.dtype))


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """mask[b, t, s] = attention_mask[b, s] and s <= t.  attention_mask: [batch, seq] -> [batch, seq, seq]."""
    seq = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def attention_mask_for(cfg: ModelConfig, attention_mask: jax.Array) -> jax.Array | CausalTokens:
    """The causal mask over `attention_mask` [batch, seq] in the form cfg's attention implementation takes:
    dense [batch, seq, seq] for xla, `CausalTokens` for a kernel (models/attention.py)."""
    if resolve_attention(cfg.attention, cfg.dtype) == "xla":
        return causal_mask(attention_mask)
    return CausalTokens(attention_mask.astype(bool))


def cache_mask(valid: jax.Array, index: jax.Array, seq: int) -> jax.Array:
    """mask[b, t, s] = valid[b, s] and s <= index + t (index a scalar, or [batch]: a slot per row).
    valid: [batch, cache_len] -> [batch, seq, cache_len]."""
    slots = jnp.arange(valid.shape[1], dtype=jnp.int32)
    query_slots = jnp.reshape(index, (-1, 1)) + jnp.arange(seq, dtype=jnp.int32)  # [1 or batch, seq]
    return valid[:, None, :] & (slots[None, None, :] <= query_slots[:, :, None])


class _WithDecoder(nnx.Module):
    """Shared forward for the three heads: full-sequence hidden states with an attention mask."""

    config: ModelConfig
    model: Decoder

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids: [batch, seq] -> final-normed hidden states [batch, seq, embed].

        attention_mask: [batch, seq], 1 for real tokens, 0 for pads (either side). positions: [batch, seq],
        default 0..seq-1 (as transformers); left-padded prompts want cumsum(mask) - 1.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=bool)
        if positions is None:
            positions = default_positions(input_ids)
        hidden, _ = self.model(input_ids, positions, attention_mask_for(self.config, attention_mask))
        return hidden


class CausalLM(_WithDecoder):
    """LlamaForCausalLM / Qwen2ForCausalLM.  lm_head kernel: [embed, vocab] (tied: the embedding)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Decoder(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(
                _normal(rngs, (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype)), ("embed", "vocab")
            )
        else:
            self.lm_head = None

    def lm_head_weight(self) -> jax.Array:
        """The output projection as [embed, vocab] in the compute dtype (the transposed embedding when tied)."""
        dtype = jnp.dtype(self.config.dtype)
        if self.lm_head is None:
            return self.model.embed[...].astype(dtype).T
        return self.lm_head[...].astype(dtype)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [batch, seq, embed] -> logits [batch, seq, vocab] in the compute dtype."""
        return constrain(hidden @ self.lm_head_weight(), ("batch", "seq", "vocab"))

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids: [batch, seq] -> logits [batch, seq, vocab]."""
        return self.lm_logits(self.hidden_states(input_ids, attention_mask, positions))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + response)."""
        cfg = self.config
        layers, kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        values = (layers, batch, kv, max_len, cfg.head_dim)
        heads_major = key_cache_layout(cfg) == "bnsk"
        keys = values if heads_major else (layers, batch, kv, cfg.head_dim, max_len)
        return KVCache(k=jnp.zeros(keys, dtype), v=jnp.zeros(values, dtype), valid=jnp.zeros((batch, max_len), bool))

    def decode(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache,
        index: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Runs `seq` new tokens against the cache: prefill (seq = prompt length) or one decode step (seq = 1).

        input_ids, positions, attention_mask: [batch, seq]; index: int32 scalar, the first cache slot to write,
        or [batch] (seq 1), each row's own slot (a row past the cache writes nothing).
        -> (logits [batch, seq, vocab], cache with slots index..index+seq-1 filled).
        """
        hidden, cache = self.decode_hidden_states(input_ids, positions, attention_mask, cache, index)
        return self.lm_logits(hidden), cache

    def decode_hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache,
        index: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
        contiguous_rows: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """`decode` without the lm head: -> (final-normed hidden [batch, seq, embed], cache). A sampler that
        needs only the last position's logits applies `lm_logits` to that position alone.

        rope: (cos, sin) [batch, seq, head_dim] of `positions`, from `rotary_tables`. A decode loop computes
        them for all its steps before the loop: computed inside, XLA:CPU fuses cos/sin into every layer's
        rotation of q and k and so recomputes them per head and per layer, every step.

        A prefill from slot 0 (index the Python int 0, several tokens) goes through the attention kernel when
        the config picks one: the cache holds nothing before these tokens. Decode steps read the cache (xla),
        or through the decode kernel (models/attention.py) when the config has one and the caller passes
        contiguous_rows: it vouches that every row's valid slots, the one written now included, are one run
        ending at `index` (the sampler's: left-padded prompts, then every step fed with mask True). Each row
        then attends to slots first valid .. index; with a gap in a row the kernel would attend to it. With
        an index per row (the slot engine: each row's slots a run from slot 0) the splash implementation's
        paged kernel reads slots 0 .. index of each row instead.
        """
        cfg = self.config
        kernel_prefill = (isinstance(index, int) and index == 0 and input_ids.shape[1] > 1
                          and resolve_attention(cfg.attention, cfg.dtype) != "xla")
        kernel_decode = contiguous_rows and input_ids.shape[1] == 1 and decodes_with_kernel(cfg)
        index = jnp.asarray(index, jnp.int32)
        paged_decode = contiguous_rows and index.ndim == 1 and decodes_slots_with_paged_kernel(cfg)
        if index.ndim == 1:  # a slot per row, one token each (the slot engine)
            if input_ids.shape[1] != 1:
                raise ValueError(f"decode: a write slot per row takes one token a row, got {input_ids.shape[1]}")
            valid = write_rows(cache.valid, attention_mask[:, 0].astype(bool), index, ("batch", "cache_seq"), 1)
        else:
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool), (0, index))
        cache = cache._replace(valid=valid)
        if kernel_prefill:
            mask = CausalTokens(attention_mask.astype(bool))
        elif paged_decode:  # the slot engine's rows, each from slot 0
            mask = CacheRows(start=jnp.zeros_like(index), end=index + 1)
        elif kernel_decode:
            mask = CacheRows(start=jnp.argmax(valid, axis=1).astype(jnp.int32), end=index + 1)
        else:
            mask = cache_mask(valid, index, input_ids.shape[1])
        return self.model(input_ids, positions, mask, cache, index, rope)

    def rotary_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin of rotary embedding at `positions` [batch, seq] -> each [batch, seq, head_dim]."""
        return self.model.rotary_tables(positions)


def last_token_index(input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """Index of the last non-pad token of each row (rightmost), as transformers pools sequence classifiers.

    With an attention mask: the rightmost position whose mask is 1. Without: the rightmost token that is not
    `pad_token_id` (or the last position when there is no pad id).  -> [batch] int32
    """
    seq = input_ids.shape[1]
    if attention_mask is not None:
        real = attention_mask.astype(bool)
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return jnp.full((input_ids.shape[0],), seq - 1, jnp.int32)
    return jnp.max(jnp.where(real, jnp.arange(seq, dtype=jnp.int32)[None], -1), axis=1).clip(0)


class RewardModel(_WithDecoder):
    """LlamaForSequenceClassification / Qwen2ForSequenceClassification.  score kernel: [embed, num_labels]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Decoder(cfg, rngs)
        self.score = param(
            _normal(rngs, (cfg.hidden_size, cfg.num_labels), jnp.dtype(cfg.param_dtype)), ("embed", "labels")
        )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids: [batch, seq] -> scores [batch, num_labels] (float32) at each row's last non-pad token."""
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return (pooled @ self.score[...].astype(pooled.dtype)).astype(jnp.float32)


class ValueModel(_WithDecoder):
    """PPO critic: the decoder with a per-token scalar head.  value_head kernel: [embed, 1], bias: [1]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Decoder(cfg, rngs)
        pdt = jnp.dtype(cfg.param_dtype)
        self.value_head = param(_normal(rngs, (cfg.hidden_size, 1), pdt), ("embed", "labels"))
        self.value_bias = param(jnp.zeros((1,), pdt), ("labels",))

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """input_ids: [batch, seq] -> values [batch, seq] (float32)."""
        hidden = self.hidden_states(input_ids, attention_mask, positions)
        values = hidden @ self.value_head[...].astype(hidden.dtype) + self.value_bias[...].astype(hidden.dtype)
        return values[..., 0].astype(jnp.float32)


def value_model_from(policy: CausalLM | RewardModel, rngs: nnx.Rngs) -> ValueModel:
    """A critic whose decoder starts as a copy of `policy`'s, with a fresh value head (as the recipe's PPO).

    The decoder is never initialised at random: the critic is built abstractly, and only its head is made, by a
    jitted constructor of which XLA keeps nothing but the head (the head's values are those a full
    `ValueModel(config, rngs)` would get). So an 8B critic costs its copy of the decoder (sharded as the
    policy's is) and no whole random decoder on one device. The head is on the default device.
    """
    cfg = policy.config
    critic = nnx.eval_shape(lambda: ValueModel(cfg, nnx.Rngs(0)))
    head = nnx.jit(lambda r: nnx.state(ValueModel(cfg, r), _VALUE_HEAD))(rngs)
    nnx.update(critic, head)
    nnx.update(critic.model, jax.tree.map(jnp.copy, nnx.state(policy.model, nnx.Param)))
    return critic


def _VALUE_HEAD(path, _value) -> bool:  # nnx filter: the critic's own params, not its decoder's
    return path[0] in ("value_head", "value_bias")


MODEL_CLASSES = {"causal_lm": CausalLM, "seq_cls": RewardModel}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs | None = None, task: str | None = None):
    """The module for `cfg.architecture` (or for task 'value': a ValueModel), randomly initialised."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    cls = ValueModel if task == "value" else MODEL_CLASSES[cfg.kind]
    return cls(cfg, rngs)
