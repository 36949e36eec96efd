"""A checkpoint commit that waits for the test (imported by worker processes before they train).

With TEST_SAVE_GATE=DIR set, the first checkpoint commit of the process touches DIR/saving and waits (in
orbax's background thread; the training loop goes on) until the test creates DIR/go. Unset: nothing changes.
"""

import asyncio
import os

from orbax.checkpoint._src.path import atomicity


def install() -> None:
    gate = os.environ.get("TEST_SAVE_GATE")
    if not gate:
        return
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def gated_finalize(self, *args, **kwargs):
        if not os.path.exists(os.path.join(gate, "go")):
            open(os.path.join(gate, "saving"), "w").close()
            for _ in range(6000):
                if os.path.exists(os.path.join(gate, "go")):
                    break
                await asyncio.sleep(0.05)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = gated_finalize
