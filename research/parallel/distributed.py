"""Multi-host start-up through JAX's own distributed runtime.

Every process runs the same command; `initialize` joins them before any JAX computation. With
no flags, SLURM (several tasks) and Cloud TPU pods are detected from the environment by JAX
itself; a single process needs nothing.
"""

from __future__ import annotations

import os

import jax

from research.config import ConfigError


def _cluster_detected() -> bool:
    """SLURM with several tasks, or a Cloud TPU pod slice with several hosts."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int = 60) -> None:
    """Join a multi-process run (a no-op for one process).

    `heartbeat_timeout` bounds how long the survivors wait before failing when a process dies.
    """
    flags = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    given = [name for name, value in flags.items() if value is not None]
    if given and len(given) < len(flags):
        missing = [name for name in flags if name not in given]
        raise ConfigError(f"{', '.join(missing)}: required with {', '.join(given)} "
                          "(a multi-process run needs all three)")
    if not given and not _cluster_detected():
        return
    if given:
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id}: must be in 0..{num_processes - 1}")
    # CPU processes exchange collectives through gloo (TCP); GPUs and TPUs use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
