"""One process of a multi-host training test (tests/test_multihost.py starts one or two of these).

    python tests/multihost_worker.py '{"process_id": 0, "num_processes": 2, "port": 12345,
                                       "runs": [["run.output_dir=...", ...], ...]}'

Each entry of `runs` is the key=value overrides of one `train` on the tiny default config (and optionally
"--allow-config-change", and "--import=MODULE_OR_FILE" as `rlmt-jax train --import`), run one after the other
in this process. With num_processes > 1 the process joins a JAX cluster on localhost (CPU collectives
over gloo) through the run config's `distributed.*` keys. The last line printed is a JSON summary.
XLA_FLAGS (the simulated devices of this process) is set by the caller.

With `"build_tiny": true` instead of `runs` (tests/test_tiny_build.py), the processes join the cluster, wait
for each other, and all build the built-in tiny models into $RLMT_JAX_CACHE at once; the summary has the
sha256 of every file of the cached folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import jax


def main(spec: dict) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import save_gate  # tests/ is this script's folder: TEST_SAVE_GATE holds a checkpoint commit for the test

    save_gate.install()
    from rlmt_jax.algorithms import import_variants
    from rlmt_jax.settings.config import resolve
    from rlmt_jax.trainer.loop import train

    processes = spec["num_processes"]
    cluster = [] if processes == 1 else [
        f"distributed.coordinator_address=localhost:{spec['port']}", f"distributed.num_processes={processes}",
        f"distributed.process_id={spec['process_id']}"]
    steps, seconds, stopped = [], [], []
    for overrides in spec["runs"]:
        start = time.perf_counter()
        allow = "--allow-config-change" in overrides  # as `rlmt-jax train --allow-config-change` does
        import_variants([o.split("=", 1)[1] for o in overrides if o.startswith("--import=")], entry_points=False)
        overrides = [o for o in overrides if not o.startswith(("--allow-config-change", "--import="))]
        summary = train(resolve(None, [*overrides, *cluster]), allow_config_change=allow)
        steps.append(summary["steps"])
        stopped.append(summary["stopped"])
        seconds.append(round(time.perf_counter() - start, 1))
    print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                      "device_count": jax.device_count(), "steps": steps, "seconds": seconds, "stopped": stopped}))


def build_tiny(spec: dict) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jax.experimental import multihost_utils

    from models.hf_io import EXPORT_MARKER
    from rlmt_jax.scale.mesh import initialize_distributed
    from rlmt_jax.inputs.tiny import VERSION, cache_root, tiny_assets_dir

    initialize_distributed(f"localhost:{spec['port']}", spec["num_processes"], spec["process_id"])
    multihost_utils.sync_global_devices("build the tiny models")  # start together, so the builds overlap
    existed = (cache_root() / f"tiny-{VERSION}").exists()
    root = tiny_assets_dir()
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != EXPORT_MARKER}  # it names the writer
    print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                      "cache_existed": existed, "files": files}))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    build_tiny(spec) if spec.get("build_tiny") else main(spec)
