"""JAX's persistent compilation cache, kept with the tool's other caches: $RLMT_JAX_CACHE/xla (default
~/.cache/rlmt_jax/xla).

A run started again (resumed after a preemption, extended, or changed in a setting that leaves its programs
as they were) loads its compiled programs from disk instead of compiling them again: the tiny default's 2-step
`rlmt-jax train` took 10.7 s instead of 21.5 s on the development machine, and an 8B model's programs take
minutes to compile on a TPU VM. JAX's own settings decide, so JAX users know them: JAX_COMPILATION_CACHE_DIR
moves the cache, JAX_ENABLE_COMPILATION_CACHE=false turns it off. JAX writes an entry from process 0 of a
multi-process run only, for programs that took at least MIN_COMPILE_SECONDS to compile (unless
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from rlmt_jax.core.cache import cache_root

log = logging.getLogger(__name__)
# Below this a program is as quick to compile as to load; the tiny default's slower programs are above it.
MIN_COMPILE_SECONDS = 0.2


def enable_compilation_cache() -> Path | None:
    """Turns the persistent compilation cache on (module docstring) and returns its folder; None when
    JAX_ENABLE_COMPILATION_CACHE=false or its folder cannot be made (said in a warning). Call it before the
    programs it should cover are compiled."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if not jax.config.jax_compilation_cache_dir:  # else the user's (JAX_COMPILATION_CACHE_DIR), kept
        path = cache_root() / "xla"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # JAX would warn at every compile instead
            log.warning("compiled programs are not cached: cannot make %s (%s)", path, err)
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
    return Path(jax.config.jax_compilation_cache_dir)
