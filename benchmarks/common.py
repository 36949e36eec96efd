"""What both benchmarks share: the benchmark Llama (made with transformers from a fixed seed) or a checkpoint
given with --model, its shape, and the machine's float32 matmul peak and read bandwidth, measured with jax."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

# The issues' benchmark model: vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads, 4 KV heads.
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32000, 512, 1408, 8, 8, 4


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """What the benchmarks' FLOP and byte counts need of a Llama/Qwen model."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def of(cls, cfg) -> "LlamaShape":
        """From a models.config.ModelConfig."""
        return cls(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                   cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings)

    def describe(self) -> str:
        return (f"vocab {self.vocab}, hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads} heads, {self.kv_heads} KV heads, head dim {self.head_dim}"
                + (", tied embeddings" if self.tied else ""))


BENCHMARK_SHAPE = LlamaShape(VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HIDDEN // HEADS)


def model_shape(path: str) -> LlamaShape:
    """The shape of the Hugging Face Llama/Qwen directory `path` (its config.json, read as our models read it)."""
    from models.config import ModelConfig

    return LlamaShape.of(ModelConfig.from_pretrained(path))


def load_hf_model(path: str):
    """transformers' causal LM from the directory `path`, in float32, eval mode (no code from the directory)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              trust_remote_code=False).eval()


def make_hf_model(path: str):
    """A randomly initialised float32 LlamaForCausalLM of the benchmark config (seed 0), saved to `path`."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path)
    return model


def best_seconds(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn()."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 n^3 matmul rate of jax on this machine, FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    return 2 * n**3 / best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def measure_read_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """Best rate of summing a float32 array of `megabytes`, bytes/s."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / best_seconds(lambda: total(x).block_until_ready(), repeats)


def decode_weight_shapes(shape: LlamaShape = BENCHMARK_SHAPE) -> list[tuple[int, int]]:
    """[in, out] of the matmuls one decode step of the model (default: the benchmark Llama) runs: per layer
    q/k/v, o, gate+up, down; then the lm head."""
    s = shape
    layer = [(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim), (s.heads * s.head_dim, s.hidden),
             (s.hidden, 2 * s.intermediate), (s.intermediate, s.hidden)]
    return layer * s.layers + [(s.hidden, s.vocab)]


def measure_matmul_stream(rows: int, shapes: list[tuple[int, int]], repeats: int = 10) -> float:
    """Rate at which float32 matmuls of `rows` rows read their weights (`shapes`, each [in, out], chained in
    one program as a decode step runs them), bytes/s: the memory-bound matmuls of a decode step."""
    keys = jax.random.split(jax.random.key(2), len(shapes))
    weights = [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes)]
    inputs = [jnp.ones((rows, n_in), jnp.float32) for n_in in sorted({n_in for n_in, _ in shapes})]
    by_width = {x.shape[1]: x for x in inputs}

    @jax.jit
    def step(weights, by_width):
        return [by_width[w.shape[0]] @ w for w in weights]

    jax.block_until_ready(step(weights, by_width))
    seconds = best_seconds(lambda: jax.block_until_ready(step(weights, by_width)), repeats)
    return sum(w.nbytes for w in weights) / seconds
