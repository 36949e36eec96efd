"""SamplingConfig: how the sampler samples (compiled into its programs), and the decode windows it implies.

The decode loop can split the response into windows, each filling its own block of the KV cache and attending
to the blocks so far only (SamplingConfig.decode_windows, cache_block_widths in rlmt_jax.rollout.decode_cache).
"""

from __future__ import annotations

import dataclasses

from rlmt_jax.core.errors import UserError

CACHE_DTYPES = ("float32", "bfloat16")
# The automatic decode windows (SamplingConfig.decode_windows): 4 windows cut a step's average cache reads to
# ~5/8 of the response slots (8 would give ~9/16), for 4 copies of the loop body in the program; responses
# shorter than MIN_TOKENS_FOR_WINDOWS keep one window (little to save, and a smaller program to compile).
AUTO_DECODE_WINDOWS = 4
MIN_TOKENS_FOR_WINDOWS = 128


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


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise UserError(f"sampling {field}: {message}")
