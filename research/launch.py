"""The process a `research` command runs in: with tcmalloc as its memory allocator when the
machine has it.

XLA:CPU allocates every step's temporary buffers afresh. With glibc's malloc the large ones
come back from the kernel as new pages each step; tcmalloc reuses them (the page faults and
step times it saves are in docs/performance.md). A command started as a program re-executes
itself once with tcmalloc preloaded (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`);
`RESEARCH_MALLOC=system` keeps the system allocator. Child processes (sweep trials, workers)
inherit the setting.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)


def tcmalloc_env(environ: Mapping[str, str],
                 paths: tuple[str, ...] = TCMALLOC_PATHS) -> dict[str, str] | None:
    """The environment to re-execute with, or None: already preloaded, turned off with
    RESEARCH_MALLOC=system, or no tcmalloc on this machine."""
    if environ.get("RESEARCH_MALLOC", "tcmalloc") == "system" or allocator(environ) == "tcmalloc":
        return None
    library = next((path for path in paths if os.path.isfile(path)), None)
    if library is None:
        return None
    preload = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": ":".join(p for p in (library, preload) if p)}


def allocator(environ: Mapping[str, str] = os.environ) -> str:
    """The memory allocator this process runs with, as benchmarks state it: step times differ
    by up to 2x between the two (docs/performance.md)."""
    return "tcmalloc" if "tcmalloc" in environ.get("LD_PRELOAD", "") else "system allocator"


def preload_tcmalloc(command: list[str]) -> None:
    """Replace this process by `command` with tcmalloc preloaded (same pid, so signals and
    exit codes are unchanged); return without doing anything when `tcmalloc_env` says so."""
    env = tcmalloc_env(os.environ)
    if env is not None:
        os.execve(command[0], command, env)


def main() -> int:
    """The `research` program: re-execute with tcmalloc first (before the ~1 s of imports the
    CLI needs, which the re-executed process would pay again), then run the command."""
    preload_tcmalloc([sys.executable, "-m", "research", *sys.argv[1:]])
    from research.cli import main as run_command

    return run_command()
