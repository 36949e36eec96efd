"""SIGTERM and SIGINT during training: stop at the end of the current step with a checkpoint.

The first signal only sets `requested`; the training loop finishes its step, agrees with the other
processes (any process asked -> every process stops after the same step), saves, and `rlmt-jax train`
exits with EXIT_STOPPED. A second signal aborts at once with the signal's default action (a save in
flight is abandoned; the next start removes its leftovers and resumes from the newest committed step).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("rlmt_jax.trainer.loop")
EXIT_STOPPED = 3  # `rlmt-jax train` stopped by a signal after saving: run the same command to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set `requested` (the signal's name) instead of killing."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second one: stop now
            log.warning("%s again: aborting without finishing the step or the checkpoint", name)
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        log.warning("%s: stopping after this step with a checkpoint (send it again to abort at once)", name)
