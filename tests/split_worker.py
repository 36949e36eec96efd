"""One process of the split placement tests (tests/test_split_placement.py starts these).

    python tests/split_worker.py '{"process_id": 0, "num_processes": 1, "port": 0, "root": "/tmp/x",
                                   "overrides": [...], "resume": true}'

Runs GRPO on the tiny built-in models with rollout.devices (the last devices of each process decode while
the others train), recording for every update the params it starts from, the rows it trains on and the
order of events (the engine's samplings and the updates). With "resume", a second run is stopped by an
exception in its third step (after step 2's checkpoint) and started again. Prints one JSON line: the behaviour
log-probs' gaps to the teacher-forced forward of each version, the events, where the arrays lie, the runs'
metrics; the test compares the exports itself.
"""

from __future__ import annotations

import json
import sys
import threading


class Interrupt(Exception):
    pass


def main(spec: dict) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rlmt_jax.rollout.split_engine import SplitEngine
    from rlmt_jax.settings.config import resolve
    from rlmt_jax.trainer.loop import Trainer, train
    from rlmt_jax.training.stage import UpdateStage

    processes = spec["num_processes"]
    cluster = [] if processes == 1 else [
        f"distributed.coordinator_address=localhost:{spec['port']}", f"distributed.num_processes={processes}",
        f"distributed.process_id={spec['process_id']}"]
    events, updates, graphdefs = [], [], []
    update, sample = UpdateStage.__call__, SplitEngine._sample

    def recorded_update(self, state, rollouts):
        events.append(("update", threading.current_thread().name))
        graphdefs.append(self.graphdef)
        params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if x.is_fully_addressable else None,
                              state.params)
        updates.append((params, {k: np.asarray(v) for k, v in rollouts.arrays.items()},
                        sorted(d.id for d in jax.tree.leaves(state.params)[0].sharding.device_set)))
        return update(self, state, rollouts)

    def recorded_sample(self, params, prompts, key, version):
        events.append(("sample", threading.current_thread().name, version,
                       sorted(d.id for d in jax.tree.leaves(params)[0].sharding.device_set)))
        return sample(self, params, prompts, key, version)

    UpdateStage.__call__, SplitEngine._sample = recorded_update, recorded_sample
    straight = resolve(None, [*spec["overrides"], f"run.output_dir={spec['root']}/straight", *cluster])
    history = train(straight)["history"]
    out = {"events": events, "history": history, "update_devices": [u[2] for u in updates]}

    if processes == 1:  # the behaviour log-probs: the teacher-forced forward of the version that sampled them
        trainer_graphdef = graphdefs[0]
        gaps = []
        for t in range(1, len(updates)):
            arrays = updates[t][1]
            mask = arrays["response_mask"].astype(bool)
            forwards = []
            for params in (updates[t - 1][0], updates[t][0]):  # version t - 1 (sampled it), version t (trains)
                model = nnx.merge(trainer_graphdef, jax.tree.map(jnp.asarray, params))
                logits = model(jnp.asarray(arrays["tokens"]), jnp.asarray(arrays["attention_mask"]).astype(bool),
                               jnp.asarray(arrays["positions"]))
                logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / straight.rollout.temperature, -1)
                forward = jnp.take_along_axis(logp, jnp.asarray(arrays["tokens"])[:, 1:, None], axis=-1)[..., 0]
                forwards.append(np.pad(np.asarray(forward), ((0, 0), (1, 0))))
            behaviour, current = (float(np.abs(f - arrays["sampler_logprobs"])[mask].max()) for f in forwards)
            gaps.append({"behaviour": behaviour, "current": current})
        out["gaps"] = gaps

    if spec.get("resume"):
        UpdateStage.__call__, SplitEngine._sample = update, sample
        resumed = resolve(None, [*spec["overrides"], f"run.output_dir={spec['root']}/resumed", *cluster])
        trainer, calls = Trainer(resumed), {"n": 0}
        original = trainer._step

        def dies_at_step_3(items):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Interrupt()
            return original(items)

        trainer._step = dies_at_step_3
        try:
            trainer.run()
        except Interrupt:
            pass
        out["resumed_history"] = train(resumed)["history"]
    print(json.dumps({"process_index": jax.process_index(), **out}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
