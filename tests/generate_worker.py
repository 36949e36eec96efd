"""One process of a multi-host `rlmt-jax generate` test (tests/test_generate_cli.py starts two of these).

    python tests/generate_worker.py '{"process_id": 0, "num_processes": 2, "port": 12345,
                                      "runs": [["--model", "...", "--input", "...", "--output", "..."], ...]}'

Each entry of `runs` is the arguments of one `rlmt-jax generate`, run one after the other in this process, each
joining the cluster on localhost (CPU collectives over gloo) through the command's --coordinator-address,
--num-processes and --process-id. The last line printed is a JSON summary with each run's exit status.
XLA_FLAGS (the simulated devices of this process) is set by the caller.
"""

from __future__ import annotations

import json
import sys

import jax


def main(spec: dict) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from rlmt_jax.cli import main as cli

    cluster = ["--coordinator-address", f"localhost:{spec['port']}", "--num-processes", str(spec["num_processes"]),
               "--process-id", str(spec["process_id"])]
    codes = [cli(["generate", *args, *cluster]) for args in spec["runs"]]
    print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                      "device_count": jax.device_count(), "codes": codes}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
