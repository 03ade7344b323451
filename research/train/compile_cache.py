"""JAX's persistent compilation cache, on for every `research` command that compiles.

A sweep of short trials compiles the same train step in every trial, and a rerun compiles it
again: with the cache on disk, every run after the first loads the executables instead
(docs/performance.md has the time to first step, cold and warm). The cache key is the
computation and the compiler, so runs of different code or shapes never share an entry.

Where: $RESEARCH_COMPILE_CACHE if set ("off" turns the cache off), else jax's own
$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/research/jax (~/.cache/research/jax).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax

ENV = "RESEARCH_COMPILE_CACHE"


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The cache directory the environment asks for (None: off)."""
    chosen = environ.get(ENV) or environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "research" / "jax"


def enable(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Point jax at the cache directory; returns it (None when turned off)."""
    path = cache_dir(environ)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every executable, however quick to compile: a short trial pays for its init, step and
    # eval compiles alike, and each is cheaper to load than to compile again.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
