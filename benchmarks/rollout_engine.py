"""Rollout engines on skewed response lengths over consecutive steps: the static Sampler, the slot engine
(SlotSampler) and the slot engine with k=1 partial rollouts (SlotSampler max_staleness=1), their carried rows'
caches recomputed or kept.

All four on the same model, prompts and keys, in one run.

Model: the benchmark Llama (benchmarks/common.py: vocab 32000, hidden 512, 8 layers, float32, 56.4M parameters),
random weights from a fixed seed (models.build_model), layers unscanned, one device.
Work: --steps steps (rollout calls of an RL run, with no training between them: the params stay as they are);
each step has its own --prompts prompts of 64 random tokens (drawn afresh per step from one generator, seed 0,
so every step's prompts come from the same distribution) and its own key, fold_in(key(--seed), step); --n
samples each (R = prompts * n rows per step), temperature 1, top-p 1, at most --cap new tokens. Response lengths
follow a skewed distribution with mean ~cap/4: a random model at temperature 1 draws nearly uniformly over the
vocabulary, so with |eos| = vocab * 4 / cap EOS ids (spread evenly over the vocabulary) each token stops its row
with probability ~4/cap, and lengths are geometric, truncated at the cap (mean ~0.98 * cap/4; a few rows run to
the cap). The observed distribution is printed.

The engines:
- static: one call per step; it decodes all R rows together until the longest stops, so every row pays for
  the longest row's steps.
- slots: one call per step; it streams the rows through --slots slots, refilled between jitted chunks of
  --chunk-tokens steps (rlmt_jax/rollout/slot_sampler.py). Once a step's last rows are admitted its slots empty
  one by one, and its tail (the few long rows) runs on mostly idle slots.
- k1: one SlotSampler(max_staleness=1) called step by step with version=step and ahead=[(the next step's prompts,
  its key)], except at the last step. The slots that free up in a step's tail start the next step's rows; the
  call returns once its own rows are done, and the next step's rows still decoding are carried: the next call
  (those prompts, that key) takes them back first, computing their caches again with its params (one prefill
  of prompt + tokens so far: `readmit`), and goes on. So the tail of a step overlaps with the next step's rows,
  and the slots stay busy across the step boundary; the price is the readmit prefill of the carried rows (and,
  in training, tokens sampled by the previous version of the policy, recorded in Rollout.versions). The first
  step has no rows carried in and the last starts none ahead, so the gain grows with --steps.
- k1keep: k1 with carried_cache="keep": the carried rows decode on in their slots with the caches they have,
  no readmit prefill (with unchanged params those caches are the ones a readmit would compute).

Every engine draws each row's tokens from the row's own random stream (fold_in of its step's key and its row
id), so with unchanged params all three return, per step, the same tokens up to float32 rounding: the engines
run a row's steps in differently shaped programs (k1 also recomputes a carried row's cache in a prefill), its
log-probs agree to ~1e-6, and a draw that lands on the boundary between two ids in the cumulative mass can go to
the neighbouring id (a rounding flip; with this model's near-uniform logits a few rows in 64 part that way).
Checked per step against the static sampler: same_tokens=True when every row of every step of both slot
engines is identical, else the rows that part at a rounding flip are listed (rounding_flips=... for slots,
k1_rounding_flips=... for k1, summed over the steps; k1keep's are printed with them), and the run fails on any other difference (after
printing its figures; same_tokens=False then, and the figures count the differing rows' tokens as they are).

Timing: first every slot engine runs the whole step sequence once (compiling every program the calls need:
k1's first step compiles the admission and chunk programs, its second the readmit programs; k1 runs first and
the programs it shares with slots, identical ones, are loaded by slots from a persistent compilation cache in a
temporary folder of this run, so they are compiled once), and static runs step 0 (its two programs depend on
the prompt count and bucket only, the same every step; a timed call that compiles fails the run). Then the sequence is timed --repeats times, the
engines taking turns at each step (so that load from other work falls on all alike); an engine's seconds are the
sum of its calls' seconds over the steps, and the best sequence is kept (benchmarks/common.py best_seconds' rule,
on whole sequences). Useful tokens = the sum over the steps of an engine's response lengths (EOS included, pads
not; each engine's own, as rows that part at a rounding flip differ in length; for k1 a row's tokens count in
its own step, whichever call sampled them); tok/s = useful tokens / seconds of the whole calls (prefill,
decode, readmit, results on the host). XLA runs as it starts (benchmarks/fair_timing.py xla_threads_note);
every figure line ends with the load average.

With --profile (off by default: it adds a minute or two at the defaults), one more step sequence of each slot
engine, instrumented (each program waited for in turn; its seconds are
one sequence's, not the best of --repeats): how many chunks, admissions and readmissions it runs, the decode
steps its chunks run, how busy the slots are in them (and, for k1, how many slot-steps went to the next step's
rows), and where its seconds go (chunks, admissions, readmissions, the host between them), beside the static
sampler's steps and its seconds per step.

The script starts itself again with the host-memory settings `rlmt-jax` uses on CPU (rlmt_jax/scale/host_memory.py).

Last lines, for scripts:
    rollout_engine what=static steps=... rows=... slots=... cap=... mean_len=... useful_tokens=... seconds=... tok_s=... load=...
    rollout_engine what=slots steps=... rows=... slots=... cap=... mean_len=... useful_tokens=... seconds=... tok_s=... load=...
    rollout_engine what=k1 steps=... rows=... slots=... cap=... mean_len=... useful_tokens=... seconds=... tok_s=... load=...
    rollout_engine what=slots tok_s=... static_tok_s=... ratio=... k1_tok_s=... k1_ratio=... same_tokens=... rounding_flips=... k1_rounding_flips=... load=...
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, VOCAB  # noqa: E402
from benchmarks.fair_timing import load_field, xla_threads_note  # noqa: E402
from rlmt_jax.scale.host_memory import relaunch_with_reused_memory  # noqa: E402

PROMPT = 64
TEMPERATURE = 1.0


def benchmark_model():
    """(graphdef, params) of the benchmark Llama, random float32 weights (seed 0), layers unscanned."""
    from models import build_model
    from models.config import ModelConfig

    config = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=10000.0,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
    return nnx.split(build_model(config, nnx.Rngs(0)), nnx.Param)


def spread_eos_ids(vocab: int, cap: int) -> tuple[int, ...]:
    """vocab * 4 / cap ids spread evenly over 3..vocab-1 (0..2 are pad, bos, eos of the config): at a nearly
    uniform next-token distribution a token stops its row with probability ~4 / cap, mean length ~cap / 4."""
    count = max(1, min(vocab - 3, round(vocab * 4 / cap)))
    return tuple(int(i) for i in np.linspace(3, vocab - 1, count).round().astype(int))


def length_summary(lengths: np.ndarray, cap: int) -> str:
    """'mean=63.2 p50=44 p90=150 max=256 at_cap=2/64' of the response lengths."""
    p50, p90 = np.percentile(lengths, [50, 90])
    return (f"mean={lengths.mean():.1f} p50={p50:.0f} p90={p90:.0f} max={lengths.max()} "
            f"at_cap={int((lengths >= cap).sum())}/{len(lengths)}")


def compare_rollouts(a, b, tolerance: float = 1e-4) -> tuple[list[int], list[int], float]:
    """(rows that part at a rounding flip, rows that differ otherwise, the largest log-prob difference over the
    response tokens both chose alike before any parting).

    The engines run a row's steps in batches of different shapes (R rows against S slots, other cache windows),
    so its logits agree to float32 rounding only, not bit for bit. With an inverse-CDF draw a rounding-sized
    shift of the cumulative mass moves a draw that lands on a boundary to the neighbouring id, and the row goes
    on from a different token: a rounding flip (the first differing token is the other's id +-1, after tokens
    and log-probs that agree within `tolerance`). Near-uniform logits (a random model at temperature 1: ~1/vocab
    of mass per token) make such boundary draws far likelier than a trained model's peaked ones do."""
    prompt = a.prompt_len
    tokens_a, tokens_b = np.asarray(a.tokens), np.asarray(b.tokens)
    logprobs_a, logprobs_b = np.asarray(a.logprobs)[:, prompt:], np.asarray(b.logprobs)[:, prompt:]
    mask = np.asarray(a.response_mask)[:, prompt:]
    flips, other, largest = [], [], 0.0
    for row in range(tokens_a.shape[0]):
        response_a, response_b = tokens_a[row, prompt:], tokens_b[row, prompt:]
        differ = np.flatnonzero(response_a != response_b)
        first = int(differ[0]) if len(differ) else int(mask[row].sum())
        drift = float(np.max(np.abs(logprobs_a[row, :first] - logprobs_b[row, :first]), initial=0.0))
        largest = max(largest, drift)
        if not np.array_equal(tokens_a[row, :prompt], tokens_b[row, :prompt]):
            other.append(row)
        elif len(differ):
            flipped = abs(int(response_a[first]) - int(response_b[first])) == 1 and drift <= tolerance
            (flips if flipped else other).append(row)
        elif not (a.response_lengths[row] == b.response_lengths[row] and a.stop_reason[row] == b.stop_reason[row]):
            other.append(row)
    return flips, other, largest


def describe(static, other, rows: list[int]) -> str:
    """'row 6 (token 47: 21284 vs 21285; lengths 84 vs 69), ...' for the static and another engine's rollouts."""
    prompt, parts = static.prompt_len, []
    for row in rows:
        a, b = np.asarray(static.tokens[row, prompt:]), np.asarray(other.tokens[row, prompt:])
        first = int(np.argmax(a != b))
        parts.append(f"row {row} (token {first}: {a[first]} vs {b[first]}; lengths "
                     f"{static.response_lengths[row]} vs {other.response_lengths[row]})")
    return ", ".join(parts)


def on_host(rollout):
    """The rollout with its arrays on the host (the static sampler returns device arrays, still being computed)."""
    return rollout._replace(**{field: np.asarray(getattr(rollout, field)) for field in rollout._fields
                               if isinstance(getattr(rollout, field), jax.Array)})


def timed_sequences(calls: dict[str, Callable[[int], object]], steps: int,
                    repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """({name: best seconds of `repeats` timed step sequences}, {name: the last sequence's results}).

    calls[name](step) runs the engine's call of that step; the engines take turns at each step, and a
    sequence's seconds are the sum of its calls' seconds."""
    best = {name: float("inf") for name in calls}
    results = {name: [None] * steps for name in calls}
    for _ in range(repeats):
        total = dict.fromkeys(calls, 0.0)
        for step in range(steps):
            for name, call in calls.items():
                start = time.perf_counter()
                results[name][step] = call(step)
                total[name] += time.perf_counter() - start
        best = {name: min(best[name], total[name]) for name in calls}
    return best, results


def profile_sequence(sampler, calls: list[Callable[[], object]]) -> collections.Counter:
    """The slot engine's calls (one step sequence) with its programs wrapped (these calls only): where the
    time goes.

    Every admission, readmission and chunk is waited for before the next host step (a chunk is anyway: the host
    reads its summary), so each program's seconds are its own; the host's share is the calls' rest (padding
    prompts, choosing windows, handing rows back, carrying rows over, the final Rollouts). A chunk's steps = the
    largest count gain of a slot in it (a slot active to the chunk's end gains one per step); its slot-steps are
    split between the call's own rows and the next call's (k=1: rows ahead)."""
    stats = collections.Counter()
    steps_by_window = collections.Counter()
    admitted_by_bucket = collections.Counter()
    carried = []
    admit, chunk_of, readmit, refill = sampler._admit, sampler._chunk, sampler._readmit_program, sampler._refill
    slots_of_call = {}  # the running call's slot_row and slot_batch (the host's arrays, updated in place)

    def timed_refill(params, state, batch, tag, slot_row, slot_batch, version):
        slots_of_call.update(row=slot_row, batch=slot_batch)
        pending = len(batch.pending)
        state = refill(params, state, batch, tag, slot_row, slot_batch, version)
        stats[f"rows_admitted_{tag}"] += pending - len(batch.pending)
        return state

    def timed_admit(state, cache, source, *rest):
        start = time.perf_counter()
        state = jax.block_until_ready(admit(state, cache, source, *rest))
        stats["admit_s"] += time.perf_counter() - start
        admitted_by_bucket[source.shape[0]] += 1
        return state

    def timed_readmit(params, state, ids, *rest):
        start = time.perf_counter()
        state = jax.block_until_ready(readmit(params, state, ids, *rest))
        stats["readmit_s"] += time.perf_counter() - start
        stats["readmissions"] += 1
        stats["readmit_rows"] += ids.shape[0]
        return state

    def timed_chunk(prompt_len, window):
        program = chunk_of(prompt_len, window)

        def run(params, state, version, refill_at):
            before = np.asarray(state.count) * np.asarray(state.active)
            active_before = int(np.asarray(state.active).sum())
            ahead = (slots_of_call["row"] >= 0) & (slots_of_call["batch"] == 1)
            if len(ahead) != len(before):  # the slots were just packed (only when no row of a later step runs)
                ahead = np.zeros(len(before), bool)
            start = time.perf_counter()
            state, summary = jax.block_until_ready(program(params, state, version, refill_at))
            stats["chunk_s"] += time.perf_counter() - start
            gained = np.where(before > 0, np.asarray(summary.count) - before, 0)
            steps = int(gained.max(initial=0))
            stats["chunks"] += 1
            stats["steps"] += steps
            stats["slot_steps"] += steps * int(state.last.shape[0])  # the tail runs on fewer slots, packed
            stats["slot_steps_used"] += int(gained.sum())
            stats["slot_steps_ahead"] += int(gained[ahead].sum())
            stats["active_at_start"] += active_before
            steps_by_window[window] += steps
            return state, summary
        return run

    sampler._admit, sampler._chunk, sampler._readmit_program = timed_admit, timed_chunk, timed_readmit
    sampler._refill = timed_refill
    try:
        start = time.perf_counter()
        for call in calls:
            call()
            carried.append(sum(len(batch.readmit) for batch in sampler._carry))
        stats["call_s"] = time.perf_counter() - start
    finally:
        del sampler._chunk, sampler._refill  # the class's methods again
        sampler._admit, sampler._readmit_program = admit, readmit
    stats["admissions"] = sum(admitted_by_bucket.values())
    return collections.Counter({**stats, "steps_by_window": dict(sorted(steps_by_window.items())),
                                "admitted_by_bucket": dict(sorted(admitted_by_bucket.items())), "carried": carried})


def print_profile(name: str, profile: dict, slots: int, useful: int) -> None:
    """Two lines: what a slot engine's instrumented step sequence ran, and where its seconds went."""
    chunks, steps = max(profile["chunks"], 1), max(profile["steps"], 1)
    host_s = profile["call_s"] - profile["chunk_s"] - profile["admit_s"] - profile["readmit_s"]
    ahead = (f"; {profile['slot_steps_ahead']} of the used slot-steps on the next step's rows, "
             f"{profile['rows_admitted_1']} rows started ahead, carried over per step {profile['carried']}, "
             f"{profile['readmit_rows']} rows readmitted in {profile['readmissions']} readmissions"
             if name == "k1" else "")
    print(f"{name} (one instrumented sequence, {profile['call_s']:.2f} s): {profile['chunks']} chunks running "
          f"{profile['steps']} decode steps (by window {profile['steps_by_window']}; {steps / chunks:.1f} per chunk) "
          f"on {slots} slots or fewer (the packed tail) = {profile['slot_steps']} slot-steps for {useful} tokens "
          f"({profile['slot_steps_used'] / max(profile['slot_steps'], 1):.0%} busy; "
          f"{profile['active_at_start'] / chunks:.1f} slots active at a chunk's start); {profile['admissions']} "
          f"admissions (calls by rows bucket {profile['admitted_by_bucket']}){ahead}")
    readmit = (f"readmissions {profile['readmit_s']:.2f} "
               f"({profile['readmit_s'] / max(profile['readmissions'], 1) * 1e3:.0f} ms each), " if name == "k1" else "")
    print(f"  seconds: chunks {profile['chunk_s']:.2f} ({profile['chunk_s'] / steps * 1e3:.1f} ms per step), "
          f"admissions {profile['admit_s']:.2f} ({profile['admit_s'] / max(profile['admissions'], 1) * 1e3:.0f} ms "
          f"each), {readmit}host between them {host_s:.2f} ({host_s / chunks * 1e3:.1f} ms per chunk); {load_field()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # defaults: the recipe's shape per data-parallel replica (64 prompts x 8 over the 2 replicas of 8xH100 with
    # rollout.mesh.tensor 4: 256 rows through 64 slots; ~20 minutes here); --prompts 16 --n 4 --slots 16 is quicker
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (rows = prompts * n per step)")
    parser.add_argument("--cap", type=int, default=256, help="max_new_tokens; mean response length ~cap/4")
    parser.add_argument("--slots", type=int, default=64, help="the slot engines' slots")
    parser.add_argument("--chunk-tokens", type=int, default=16, help="the slot engines' decode steps per chunk")
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps (rollout calls), each its own "
                                                             "prompts and key")
    parser.add_argument("--repeats", type=int, default=2, help="timed step sequences (the best is kept)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling key (prompts come from seed 0)")
    parser.add_argument("--profile", action="store_true", help="then one instrumented step sequence of each slot "
                                                               "engine: where its seconds go")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit(f"rollout_engine: --steps must be >= 1, got {args.steps}")
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])

    # k1 and slots compile identical admission, chunk, prefill and empty-state programs (max_staleness changes
    # the host's scheduling only): a cache of this run's own compiles lets the second load them.
    cache_dir = tempfile.mkdtemp(prefix="rollout_engine_xla_")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    from rlmt_jax.rollout.sampling import Sampler, SamplingConfig
    from rlmt_jax.rollout.slot_sampler import SlotSampler

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; {load_field()}")
    if jax.devices()[0].platform == "cpu":
        print(xla_threads_note())
    graphdef, params = benchmark_model()
    eos_ids = spread_eos_ids(VOCAB, args.cap)
    config = SamplingConfig(n=args.n, max_new_tokens=args.cap, temperature=TEMPERATURE, eos_ids=eos_ids,
                            prompt_buckets=(PROMPT,))
    rows = args.prompts * args.n
    generator = np.random.default_rng(0)
    prompts = [generator.integers(3, VOCAB, size=(args.prompts, PROMPT)).tolist() for _ in range(args.steps)]
    keys = [jax.random.fold_in(jax.random.key(args.seed), step) for step in range(args.steps)]
    engines = {"k1": SlotSampler(graphdef, config, slots=args.slots, chunk_tokens=args.chunk_tokens, max_staleness=1),
               "k1keep": SlotSampler(graphdef, config, slots=args.slots, chunk_tokens=args.chunk_tokens,
                                     max_staleness=1, carried_cache="keep"),
               "slots": SlotSampler(graphdef, config, slots=args.slots, chunk_tokens=args.chunk_tokens),
               "static": Sampler(graphdef, config)}
    order = ("static", "slots", "k1", "k1keep")  # the order of the turns and of the lines

    def call_of(name: str) -> Callable[[int], object]:
        sampler = engines[name]
        if not name.startswith("k1"):
            return lambda step: on_host(sampler(params, prompts[step], keys[step]))

        def k1_step(step: int):
            ahead = [(prompts[step + 1], keys[step + 1])] if step + 1 < args.steps else []
            return on_host(sampler(params, prompts[step], keys[step], version=step, ahead=ahead))
        return k1_step

    calls = {name: call_of(name) for name in order}
    print(f"work: {args.steps} steps of {rows} rows ({args.prompts} prompts x n={args.n}) of {PROMPT} prompt "
          f"tokens, cap {args.cap} new tokens, {len(eos_ids)} EOS ids (stop probability ~{len(eos_ids) / VOCAB:.4f} "
          f"per token); slot engines: {args.slots} slots, chunks of {args.chunk_tokens} steps; {config.windows} "
          f"decode windows")

    warm_s = {}
    for name in engines:  # k1 first: slots loads the programs they share
        start = time.perf_counter()
        for step in range(1 if name == "static" else args.steps):  # static's programs are the same every step
            calls[name](step)
        warm_s[name] = time.perf_counter() - start
    print("warm-up (compiles; one step sequence each, static one step): " + ", ".join(
        f"{name} {warm_s[name]:.1f} s ({engines[name].compiled_programs()} programs)" for name in order))

    programs = {name: sampler.compiled_programs() for name, sampler in engines.items()}
    seconds, rollouts = timed_sequences(calls, args.steps, args.repeats)
    for name, sampler in engines.items():
        assert sampler.compiled_programs() == programs[name], f"{name}: a timed call compiled a program"
    lengths = {name: [np.asarray(r.response_lengths) for r in rollouts[name]] for name in order}
    useful = {name: int(sum(step.sum() for step in lengths[name])) for name in order}
    tok_s = {name: useful[name] / seconds[name] for name in order}

    for name in order:
        print(f"response lengths, {name}: " + "; ".join(f"step {step} {length_summary(lengths[name][step], args.cap)}"
                                                       for step in range(args.steps)))
    flips, drift, other = {}, 0.0, []
    for name in ("slots", "k1", "k1keep"):
        flips[name] = 0
        for step in range(args.steps):
            static, mine = rollouts["static"][step], rollouts[name][step]
            parted, differ, largest = compare_rollouts(static, mine)
            flips[name] += len(parted)
            drift = max(drift, largest)
            if parted:
                print(f"  {name} step {step}: {len(parted)}/{rows} rows part from static at a rounding flip: "
                      f"{describe(static, mine, parted)}")
            if differ:
                other.append(f"{name} step {step}: {describe(static, mine, differ)}")
    same = not any(flips.values())
    print(f"same tokens for the same keys as static, every step: {same} (log-probs agree within {drift:.1e} until "
          f"rows part; rows parting at a rounding flip: slots {flips['slots']}, k1 {flips['k1']}, k1keep "
          f"{flips['k1keep']} of "
          f"{args.steps * rows})")
    if other:  # the figures are still printed, then the run fails
        print("rollout_engine: NOT SAME: rows that differ from static's, not by rounding: " + "; ".join(other))
    versions = [np.asarray(r.versions)[np.asarray(r.response_mask)] for r in rollouts["k1"]]
    print("k1 tokens sampled a step early (policy version step - 1): " + ", ".join(
        f"step {step} {int((v == step - 1).sum())}/{v.size}" for step, v in enumerate(versions)))

    profiles = {name: profile_sequence(engines[name], [functools.partial(calls[name], step)
                                                       for step in range(args.steps)])
                for name in (("slots", "k1") if args.profile else ())}
    static_steps = sum(int(step.max()) - 1 for step in lengths["static"])  # each loop stops with its longest row
    static_paid = rows * static_steps
    print(f"static: {static_steps} decode steps x {rows} rows = {static_paid} row-steps for {useful['static']} tokens "
          f"({useful['static'] / static_paid:.0%} useful); {seconds['static'] / static_steps * 1e3:.1f} ms per step "
          f"(the sequence's seconds / steps); {load_field()}")
    for name, profile in profiles.items():
        print_profile(name, profile, args.slots, useful[name])

    for name in order:
        print(f"rollout_engine what={name} steps={args.steps} rows={rows} slots={rows if name == 'static' else args.slots} "
              f"cap={args.cap} mean_len={np.concatenate(lengths[name]).mean():.1f} useful_tokens={useful[name]} "
              f"seconds={seconds[name]:.3f} tok_s={tok_s[name]:.0f} {load_field()}")
    print(f"rollout_engine what=slots tok_s={tok_s['slots']:.0f} static_tok_s={tok_s['static']:.0f} "
          f"ratio={tok_s['slots'] / tok_s['static']:.2f} k1_tok_s={tok_s['k1']:.0f} "
          f"k1_ratio={tok_s['k1'] / tok_s['static']:.2f} k1keep_tok_s={tok_s['k1keep']:.0f} "
          f"k1keep_ratio={tok_s['k1keep'] / tok_s['static']:.2f} same_tokens={same} rounding_flips={flips['slots']} "
          f"k1_rounding_flips={flips['k1']} {load_field()}")
    if other:
        raise SystemExit(f"rollout_engine: the engines' rollouts differ from static's for the same key, not by "
                         f"rounding, in {len(other)} step(s): " + "; ".join(other))


if __name__ == "__main__":
    main()
