"""Where the tool keeps what it builds once and reuses: the built-in tiny models, compiled programs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$RLMT_JAX_CACHE, default ~/.cache/rlmt_jax."""
    return Path(os.environ.get("RLMT_JAX_CACHE", Path.home() / ".cache" / "rlmt_jax"))
