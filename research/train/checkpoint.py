"""Orbax checkpoints of the train state, the data iterator and run metadata, with retention.

One checkpoint = one folder `checkpoints/<step>/` holding three items: `state` (params,
optimizer state, step, RNG), `data` (the grain iterator's position) and `meta` (JSON: step and
the resolved config). Policy: keep the latest `keep_last`, and every `keep_every`-th step forever.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from research.config import CheckpointConfig, ConfigError

# Orbax logs every save (INFO) and read-only restores (WARNING); a run's own lines are enough.
logging.getLogger("absl").setLevel(logging.ERROR)


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last,
            keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """Restore `state` onto the shardings in `abstract_state` (any mesh) and the iterator."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise ConfigError(f"{self.manager.directory}: no checkpoint at step {step} "
                              f"(available: {self.all_steps() or 'none'})")
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["meta"]

    def close(self) -> None:
        """Wait for any asynchronous save to land, then release the manager."""
        self.manager.close()  # waits for saves in flight
