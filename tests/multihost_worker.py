"""One process of a multi-host training test (tests/test_multihost.py starts one or two of these).

    python tests/multihost_worker.py '{"process_id": 0, "num_processes": 2, "port": 12345,
                                       "runs": [["run.output_dir=...", ...], ...]}'

Each entry of `runs` is the key=value overrides of one `train` on the tiny default config, run one after the
other in this process. With num_processes > 1 the process joins a JAX cluster on localhost (CPU collectives
over gloo) through the run config's `distributed.*` keys. The last line printed is a JSON summary.
XLA_FLAGS (the simulated devices of this process) is set by the caller.
"""

from __future__ import annotations

import json
import sys
import time

import jax


def main(spec: dict) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from rlmt_jax.config import resolve
    from rlmt_jax.trainer import train

    processes = spec["num_processes"]
    cluster = [] if processes == 1 else [
        f"distributed.coordinator_address=localhost:{spec['port']}", f"distributed.num_processes={processes}",
        f"distributed.process_id={spec['process_id']}"]
    steps, seconds = [], []
    for overrides in spec["runs"]:
        start = time.perf_counter()
        steps.append(train(resolve(None, [*overrides, *cluster]))["steps"])
        seconds.append(round(time.perf_counter() - start, 1))
    print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                      "device_count": jax.device_count(), "steps": steps, "seconds": seconds}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
