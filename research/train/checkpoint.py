"""Orbax checkpoints of the train state, the data iterator and run metadata, with retention
and integrity checks.

One checkpoint = one folder `checkpoints/<step>/` holding three items: `state` (params,
optimizer state, step, RNG), `data` (the grain iterator's position) and `meta` (JSON: step and
the resolved config). Policy: keep the latest `keep_last`, and every `keep_every`-th step forever.

Integrity: orbax/TensorStore check neither truncation nor flipped bits (a garbled array file
restores as NaNs), so once a save has landed its folder gets `sha256.json`, the digest of every
file in it. Restores verify it first. A step without one is *unverified* (it landed, but the
process stopped before the digests were written, or it predates them): it is restored as it is,
and a failure to read it counts as damage. Retention runs only after the newest step has its
digests, so it never removes the last intact checkpoint in favour of an unverified one; damaged
steps are moved aside to `checkpoints/damaged/`, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from research.config import CheckpointConfig, ConfigError

# Orbax logs every save (INFO) and read-only restores (WARNING); a run's own lines are enough.
logging.getLogger("absl").setLevel(logging.ERROR)

MANIFEST = "sha256.json"
DAMAGED = "damaged"  # sibling folder of the steps that damaged checkpoints are moved into
DIVERGED = "diverged"  # ... and the one a rollback moves the checkpoints after its failure to


class CheckpointError(ConfigError):
    """A checkpoint that is missing, damaged or unreadable (one line, exit code 2)."""


def _digests(step_dir: Path) -> dict[str, str]:
    """sha256 of every file below `step_dir` (but the manifest), by relative path."""
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as f:
            out[path.relative_to(step_dir).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self.cfg = cfg
        self.directory = Path(directory).absolute()
        self._unsealed: list[int] = []  # saved, but not yet finished and digested
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: it must wait for the digests (see _retain)
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
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
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
        self.finish()  # the previous (asynchronous) save first
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._unsealed.append(step)
        if not self.cfg.async_save:
            self.finish()

    def finish(self) -> None:
        """Wait for saves in flight, write their digests, then apply retention."""
        if not self._unsealed:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                tmp = step_dir / f".{MANIFEST}.tmp"
                tmp.write_text(json.dumps(_digests(step_dir), indent=1))
                os.replace(tmp, step_dir / MANIFEST)
        self._unsealed = []
        self._retain()

    def _retain(self) -> None:
        """Keep the latest keep_last steps and every keep_every-th; called right after the
        newest step got its digests, so the one kept last is always an intact one."""
        steps = self.all_steps()
        keep = set(steps[-self.cfg.keep_last:])
        if self.cfg.keep_every:
            keep |= {s for s in steps if s % self.cfg.keep_every == 0}
        for step in steps:
            if step not in keep:
                self.manager.delete(step)

    def damage(self, step: int) -> str | None:
        """Why checkpoint `step` is damaged, or None when its files match their digests (or it
        has none to check: unverified)."""
        step_dir = self.directory / str(step)
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            return None
        try:
            expected = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return f"{manifest} is unreadable"
        found = _digests(step_dir)
        for name, digest in expected.items():
            if name not in found:
                return f"{step_dir / name} is missing"
            if found[name] != digest:
                return f"{step_dir / name} does not match its checksum"
        return None

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint `step` (default: the latest) onto the shardings in
        `abstract_state` (any mesh) and the iterator; a damaged one is refused."""
        return self._read(self.verified_step(step), abstract_state, data_iterator)

    def verified_step(self, step: int | None) -> int:
        """`step` (None: the latest) if it exists and its files match their digests; else a
        CheckpointError naming what is wrong and the newest intact step before it."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} "
                                  f"(available: {self.all_steps() or 'none'})")
        problem = self.damage(step)
        if problem:
            intact = [s for s in self.all_steps() if s < step and not self.damage(s)]
            hint = f" (the newest intact one: --step {intact[-1]})" if intact else ""
            raise CheckpointError(f"checkpoint {step} is damaged: {problem}{hint}")
        return step

    def _read(self, step: int, abstract_state: Any, data_iterator: Any | None
              ) -> tuple[Any, dict[str, Any]]:
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, OSError, KeyError) as exc:  # incl. TensorStore and JSON decode errors
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise CheckpointError(f"checkpoint {step} could not be read: {first}") from None
        return restored["state"], restored["meta"]

    def resume(self, abstract_state: Any, data_iterator: Any) -> tuple[int | None, Any, list[str]]:
        """Restore the newest intact checkpoint: (step, state, notes). Damaged newer steps are
        moved to checkpoints/damaged/, one note each; (None, None, notes) when none is left."""
        notes = []
        for step in reversed(self.all_steps()):
            problem = self.damage(step)
            why = f"checkpoint {step} is damaged ({problem})"
            if not problem:
                try:
                    state, _ = self._read(step, abstract_state, data_iterator)
                    return step, state, notes
                except CheckpointError as exc:
                    if (self.directory / str(step) / MANIFEST).is_file():
                        raise  # intact files that do not fit this run: not damage
                    why = str(exc)
            notes.append(f"{why}: moved to {self.move_aside(step)}, resuming from the one before")
        return None, None, notes

    def move_aside(self, step: int, folder: str = DAMAGED) -> Path:
        """Move checkpoint `step` to checkpoints/<folder>/ (never deleted): damaged ones, or
        those a rollback left behind (DIVERGED)."""
        target = self.directory / folder / str(step)
        for n in range(1, 1000):
            if not target.exists():
                break
            target = self.directory / folder / f"{step}.{n}"
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(self.directory / str(step), target)
        except FileNotFoundError:  # another process of a multi-host run moved it first
            pass
        self.manager.reload()
        return target

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the params of the checkpoint at `step` (default: latest), onto the shardings in
        `abstract_params` (any mesh): the way a new run starts from another run's weights. A
        damaged step is refused, as `restore` refuses it."""
        step = self.verified_step(step)
        reader = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False), item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        target = {"params": abstract_params}
        try:
            restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        except (ValueError, OSError, KeyError) as exc:  # an unverified step that does not read
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise CheckpointError(f"checkpoint {step} could not be read: {first}") from None
        finally:
            reader.close()
        return restored["state"]["params"]

    def close(self) -> None:
        """Wait for any asynchronous save to land (and digest it), then release the manager."""
        try:
            self.finish()
        finally:
            self.manager.close()
