"""`research import-hf` and `research export-hf`: run directories <-> Hugging Face model folders.

Both check everything they can (config mapping, shapes, the output location) before writing,
and write into a hidden sibling folder renamed into place at the end, so an interrupted import
or export never looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from research import flags
from research.config import ConfigError, ExperimentConfig
from research.interop import hf

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size


@contextmanager
def _staged(target: Path, force: bool = False) -> Iterator[Path]:
    """A fresh hidden folder beside `target`, renamed to `target` when the block succeeds
    (replacing an existing one only with `force`) and removed when it fails."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if force and target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


# ----------------------------------------------------------------------------- import


def import_hf(hf_dir: Path, run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """Write a run directory (config.yaml, step-0 checkpoint, tokenizer.json) from an HF folder."""
    import jax

    from research import config as config_lib
    from research.data import mixture
    from research.data.tokenizer import load_tokenizer
    from research.train.loop import prepare
    from research.train.rundir import RunDir
    from research.train.state import state_from_params

    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--run-dir: {run_dir} is not empty; import into a new directory")
    hf_config = hf.read_config(hf_dir)
    model = hf.model_from_hf(hf_config, f"{hf_dir}/config.json")
    hf.SafetensorsReader(hf_dir)  # a missing, truncated or malformed file: refused before any work
    raw: dict[str, Any] = {"name": hf_dir.resolve().name, "model": model}
    tokenizer = hf_dir / "tokenizer.json"
    found = tokenizer if tokenizer.is_file() else None
    raw["data"] = {"tokenizer": str(tokenizer.resolve()) if found else "byte"}
    # documents (and prompts) start as this model's own tokenizer starts a text
    raw["data"]["document_start"] = hf.document_start(
        hf_config, found, load_tokenizer(raw["data"]["tokenizer"]).eos_id)
    cfg = config_lib.validate(config_lib.apply_overrides(raw, overrides))
    setup = prepare(cfg)
    with setup.context():
        params = hf.load_params(hf_dir, cfg.model, setup.spec.abstract["params"])
        state = state_from_params(params, setup.tx, setup.spec, cfg.train.seed)
    data = mixture.train_iterator(setup.data, seq_len=cfg.train.seq_len,
                                  global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        run_dir.rmdir()  # empty (checked above)
    with _staged(run_dir) as tmp:
        staged = RunDir(tmp)
        if cfg.data.tokenizer == str(tokenizer.resolve()):
            shutil.copyfile(tokenizer, staged.tokenizer)
            copied = str(RunDir(run_dir.resolve()).tokenizer)
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": copied})})
        staged.write_config(cfg.to_yaml())
        checkpoints = staged.checkpointer(cfg.checkpoint, read_only=False)
        checkpoints.save(0, state, data, {"step": 0, "config": cfg.to_dict(),
                                          "imported_from": str(hf_dir.resolve())})
        checkpoints.close()
    return cfg


# ----------------------------------------------------------------------------- export


def _eval_loss(run_dir: Path, step: int) -> float | None:
    from research.train.rundir import RunDir

    losses = [e["eval_loss"] for e in RunDir(run_dir).metrics() if e.get("step") == step
              and "eval_loss" in e]
    return losses[-1] if losses else None


def model_card(cfg: ExperimentConfig, family: str, step: int, eval_loss: float | None) -> str:
    tokens = step * cfg.train.batch_size * cfg.train.seq_len
    loss = "not evaluated at this step" if eval_loss is None else f"{eval_loss:.4f} nats/token"
    data = cfg.data.source or ", ".join(f"{name}: {spec.source} (weight {spec.weight:g})"
                                        for name, spec in cfg.data.sources.items())
    return (f"---\nlibrary_name: transformers\ntags: [research, {family}]\n---\n\n"
            f"# {cfg.name} (step {step})\n\n"
            f"A {hf.ARCHITECTURES[family]} trained with `research` and exported by "
            "`research export-hf`.\n\n"
            f"| | |\n|---|---|\n| step | {step} |\n| tokens seen | {tokens:,} |\n"
            f"| held-out loss | {loss} |\n| data | {data} |\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\n"
            "tokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
            f"## Training config\n\n```yaml\n{cfg.to_yaml()}```\n")


def _write_tokenizer(cfg: ExperimentConfig, eos_id: int, folder: Path) -> None:
    """The run's tokenizer.json (or the byte tokenizer's equivalent) + tokenizer_config.json."""
    from tokenizers import Tokenizer

    if cfg.data.tokenizer == "byte":
        text = hf.byte_tokenizer_json()
    else:
        text = Path(cfg.data.tokenizer).expanduser().read_text()
    (folder / "tokenizer.json").write_text(text)
    eos = Tokenizer.from_str(text).id_to_token(eos_id)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
         "model_max_length": cfg.train.seq_len, "clean_up_tokenization_spaces": False}, indent=1))


def export_step(setup: Any, params: Any, step: int, run_dir: Path, folder: Path,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One checkpoint's params -> an HF folder (config.json, safetensors, tokenizer, README)."""
    import jax
    from flax.traverse_util import flatten_dict

    cfg = setup.cfg
    eos_id = setup.data.tokenizer.eos_id
    family = hf.family_of(cfg.model)
    config = hf.model_to_hf(cfg.model, setup.vocab_size, eos_id, cfg.train.seq_len)
    leaves = flatten_dict(params)
    tensors = dict(hf.params_to_hf(cfg.model, setup.vocab_size,
                                   lambda path: np.asarray(jax.device_get(leaves[path]))))
    hf.write_safetensors(tensors, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id}, indent=1))
    _write_tokenizer(cfg, eos_id, folder)
    (folder / "README.md").write_text(model_card(cfg, family, step, _eval_loss(run_dir, step)))


def export_hf(run_dir: Path, out: Path, step: int | None, all_steps: bool, force: bool,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> list[int]:
    """Export one checkpoint (default: the latest) or every kept one into out/step_XXXXXXX/."""
    from research.train.loop import load_run
    from research.train.rundir import RunDir

    run = RunDir(run_dir)
    hf.family_of(run.config().model)  # refuse before anything is read or written
    if out.exists() and not force:
        raise ConfigError(f"--out: {out} exists; pass --force to replace it")
    steps = run.steps() if all_steps else [run.check_step(step)]
    if not steps:
        raise ConfigError(f"--all-steps: {run_dir} has no checkpoint")
    setup, state, _ = load_run(run, steps[0])
    with _staged(out, force) as tmp:
        for s in steps:
            folder = tmp / f"step_{s:07d}" if all_steps else tmp
            folder.mkdir(exist_ok=True)
            if s != steps[0]:
                with setup.context():
                    state, _ = run.restore(setup.spec.abstract, s)
            export_step(setup, state["params"], s, run_dir, folder, max_shard_bytes)
    return steps


# ----------------------------------------------------------------------------- commands


def _import(args: argparse.Namespace) -> int:
    cfg = import_hf(Path(args.hf_dir), Path(args.run_dir), args.overrides)
    print(f"{args.run_dir}: step-0 checkpoint of {args.hf_dir} "
          f"({hf.family_of(cfg.model)}, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}); "
          f"continue with: research train {args.run_dir}/config.yaml --run-dir {args.run_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    steps = export_hf(Path(args.run_dir), Path(args.out), args.step, args.all_steps, args.force)
    print(f"{args.out}: exported step{'s' if len(steps) > 1 else ''} "
          f"{', '.join(map(str, steps))} of {args.run_dir}")
    return 0


def add_interop_commands(subparsers: Any) -> None:
    """Register `import-hf` and `export-hf` on the `research` command's subparsers."""
    imp = subparsers.add_parser("import-hf", help="a Hugging Face model folder -> a run directory "
                                "(step-0 checkpoint)")
    imp.add_argument("hf_dir", help="folder with config.json, *.safetensors (and tokenizer.json)")
    imp.add_argument("--run-dir", required=True, help="new run directory")
    imp.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides, e.g. model.scan_layers=false train.seq_len=1024")
    imp.set_defaults(func=_import)

    exp = subparsers.add_parser("export-hf", help="a run's checkpoint(s) -> Hugging Face folder(s)")
    exp.add_argument("run_dir")
    which = exp.add_mutually_exclusive_group()
    which.add_argument("--step", type=flags.non_negative, help="checkpoint step (default: latest)")
    which.add_argument("--all-steps", action="store_true",
                       help="every kept checkpoint, into OUT/step_XXXXXXX/")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp.set_defaults(func=_export)
