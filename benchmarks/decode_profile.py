"""Where a decode step's time goes on this CPU: the sampler's decode loop traced with jax.profiler, its ops
grouped by what they do, per generated token.

The model and shapes are benchmarks/time_plan.py's (benchmark Llama, 8 rows, 64 prompt + 64 new tokens, one
decode window), sampled as the trainer samples (the decode layout's copy and the KV cache in --dtype). Ops are
XLA:CPU thunks, named by the compiled program (its HLO text): each one is put in a group by the jnp call it
came from (the op_name metadata) and by its kind:
  weight matmuls    dots against the layers' kernels        lm head      the [rows, vocab] dot
  attention dots    q.k and p.v against the KV cache         cache writes dynamic-update-slice fusions
  converts          dtype casts that are their own op        other        norms, rope, softmax, sampling, ...
Only ops that run once per generated token (64 times a call) are counted; prefill is left out.

Last lines:  decode_profile dtype=... group=... ms_per_step=... share=...
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.time_plan import NEW, policy_sampler, run_config, write_configs  # noqa: E402
from rlmt_jax.scale.host_memory import relaunch_with_reused_memory  # noqa: E402

_OP_NAME = re.compile(r'^\s*%([\w.\-]+) = .*op_name="([^"]*)"')


def group_of(name: str, op_name: str) -> str:
    """The group (module docstring) of the thunk `name` whose HLO metadata says `op_name`."""
    if "dynamic-update-slice" in name or "dynamic_update_slice" in op_name:
        return "cache writes"
    if "dot_general" in op_name:
        if "bd,vd->bv" in op_name or "btd,vd->btv" in op_name:
            return "lm head"
        if "bngk," in op_name or "bngs," in op_name:
            return "attention dots"
        return "weight matmuls"
    if name.startswith(("wrapped_convert", "convert")):
        return "converts"
    return "other"


def profile(dtype: str) -> tuple[dict[str, float], float]:
    """({group: ms per decode step}, wall ms per decode step) of one traced sampler call in `dtype`."""
    from rlmt_jax.scale import mesh as mesh_lib

    with tempfile.TemporaryDirectory() as root:
        cfg = run_config(*write_configs(root))
        _, params, sampler, prompts = policy_sampler(cfg, dtype)
    key = jax.random.key(0)
    layout = sampler.layout
    with mesh_lib.activation_sharding(layout.mesh, layout.rules):
        copy = sampler.rollout_params(params)
        ids, mask, _ = sampler._padded(prompts)

        def call(decode: bool = True):
            cache, first, first_logprobs, positions = sampler._prefill(copy, ids, mask, key)
            if decode:
                return jax.block_until_ready(sampler._decode(copy, cache, first, first_logprobs, positions, ids,
                                                             mask, key))
            return jax.block_until_ready(first)

        call(), call(False)
        start = time.perf_counter()
        call(False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        call()
        wall = (time.perf_counter() - start - prefill) / NEW * 1e3
        hlo = sampler.compiled_decode_text(copy, prompts, key)
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                call()
            path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
            with gzip.open(path) as f:
                events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    op_names = {m.group(1): m.group(2) for m in map(_OP_NAME.match, hlo.splitlines()) if m}
    # ynn fusions carry the op_name of the dot they wrap on their fused computation, not on the call: look there
    calls = dict(re.findall(r"%([\w.\-]+) = .*calls=%([\w.\-]+)", hlo))
    for name, computation in calls.items():
        if name not in op_names:
            body = re.search(rf"^%{re.escape(computation)} .*?^}}", hlo, re.M | re.S)
            found = _OP_NAME.search(body.group(0).split("\n", 1)[1]) if body else None
            op_names[name] = found.group(2) if found else ""
    durations, counts = collections.Counter(), collections.Counter()
    for event in events:
        durations[event["name"]] += event["dur"] / 1e3
        counts[event["name"]] += 1
    groups: dict[str, float] = collections.defaultdict(float)
    for name, ms in durations.items():
        if name in op_names and counts[name] >= NEW - 1:  # once per generated token (the last token feeds none)
            groups[group_of(name, op_names[name])] += ms / NEW
    return dict(groups), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    relaunch_with_reused_memory([os.path.abspath(__file__), *sys.argv[1:]])
    lines = []
    for dtype in args.dtypes:
        groups, wall = profile(dtype)
        total = sum(groups.values())
        print(f"{dtype}: {wall:.2f} ms a decode step (wall); its per-token ops add up to {total:.2f} ms "
              "(ops on the two cores overlap)")
        for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {group:16s} {ms:7.2f} ms  {ms / total:6.1%}")
            lines.append(f"decode_profile dtype={dtype} group={group.replace(' ', '_')} ms_per_step={ms:.3f} "
                         f"share={ms / total:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
