"""Config errors fail before any compute: one line naming the field, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from research import config
from research.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, expected", [
    (["model.n_layerz=3"], "model.n_layerz: unknown field; did you mean model.n_layers?"),
    (["trian.steps=3"], "trian: unknown field; did you mean train?"),
    (["train.steps=ten"], "train.steps: Input should be a valid integer"),
    (["train.steps=0"], "train.steps: Input should be greater than 0"),
    (["model.n_heads=3"], "model.n_heads=3 must divide model.d_model=256"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
    (["model.compute_dtype=float16"], "model.compute_dtype: Input should be 'float32' or 'bfloat16'"),
    (["model.backward_dtype=bfloat16"],
     "model.backward_dtype=bfloat16 needs model.compute_dtype=bfloat16"),
    (["mesh.data=-1", "mesh.tensor=-1"], "at most one of mesh.data/fsdp/expert/tensor may be -1"),
    (["train.grad_accum=3"], "train.grad_accum=3 must divide train.batch_size=16"),
    (["mesh.rules=[[act_batch, [dat]]]"], "maps to unknown mesh axis 'dat'"),
    (["steps"], "override 'steps': expected key=value"),
    (["model.mamba.dt_min=0.5"], "model.mamba.dt_min=0.5 must be <= model.mamba.dt_max=0.1"),
    (["model.embedding_multiplier=0"], "model.embedding_multiplier: Input should be greater than 0"),
    (["model.output_multiplier=nan"], "model.output_multiplier: Input should be a finite number"),
    (["model.layer_pattern=[mamba:mlp]", "model.mamba.head_dim=48"],
     "model.mamba.head_dim=48 must divide expand*d_model=512"),
    (["model.layer_pattern=[attention:mlp, mamba:moe]", "model.n_layers=3"],
     "model.n_layers=3 must be a multiple of the 2 entries of model.layer_pattern"),
])
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_overrides_are_typed_and_yaml_round_trips(tmp_path):
    cfg = config.load(ROOT / "experiments/dense_tiny.yaml",
                      ["optim.lr=3e-3", "model.sliding_window=null", "logging.tensorboard=false"])
    assert cfg.optim.lr == 0.003 and cfg.model.sliding_window is None
    assert cfg.logging.tensorboard is False and cfg.name == "dense_tiny"
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert config.load(path) == cfg.model_copy(update={"name": cfg.name})


def test_mesh_auto_fill_and_mismatch():
    mesh = config.MeshConfig(data=-1, tensor=2)
    assert mesh.shape(8) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="the 3 available devices"):
        mesh.shape(3)
    with pytest.raises(ConfigError, match="= 4 but 8 devices"):
        config.MeshConfig(data=4).shape(8)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "research", *args], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("args, expected", [
    (["train", "experiments/dense_tiny.yaml", "model.n_layer=8"], "did you mean model.n_layers?"),
    (["train", "experiments/missing.yaml"], "experiments/missing.yaml: no such config file"),
    (["train", "experiments/dense_tiny.yaml", "mesh.data=3"], "mesh"),
    (["train", "experiments/dense_tiny.yaml", "train.batch_size=4", "mesh.data=8"],
     "train.batch_size=4 / train.grad_accum=1 = 4 sequences per micro-batch must be divisible"),
])
def test_cli_exits_2_with_one_line_before_compute(args, expected, tmp_path):
    result = run_cli(*args, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_yaml_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1\n")
    result = run_cli("train", str(bad))
    assert result.returncode == 2 and str(bad) in result.stderr and "line" in result.stderr


def test_one_yaml_reader_for_experiments_sweeps_and_overrides(tmp_path):
    """`1e-4` is a number wherever it is written (PyYAML alone reads it as a string), and a key
    given twice is an error in every file."""
    from research.sweep import spec

    experiment = tmp_path / "e.yaml"
    experiment.write_text("optim:\n  lr: 1e-4\n  eps: 1.0e-8\n")
    assert config.read_yaml(experiment)["optim"] == {"lr": 1e-4, "eps": 1e-8}
    assert config.parse_value("1e-4") == 1e-4 and isinstance(config.parse_value("2E3"), float)
    assert config.parse_value("1e3x") == "1e3x" and config.parse_value("3") == 3
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {ROOT}/experiments/dense_tiny.yaml\nsearch:\n  method: grid\n"
                     "  params:\n    optim.lr: [1e-4, 3e-4]\n")
    assert spec.load(sweep, check=False).spec.search.params["optim.lr"].values == (1e-4, 3e-4)
    experiment.write_text("train:\n  steps: 2\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="'train' appears twice"):
        config.read_yaml(experiment)


def test_field_roles_are_the_one_source_of_what_may_differ():
    """Resume, init_from (run or Hugging Face folder) and the analysis derive their lists from
    the schema's tags; a field without a tag defines the experiment."""
    resumable = config.fields_with_role(config.BOOKKEEPING, config.EXTENT)
    params_free = config.fields_with_role(*config.ALL_ROLES)
    assert {"name", "train.steps", "train.eval_batches", "mesh.data", "checkpoint.keep_last",
            "logging.progress", "data.cache_dir"} <= resumable
    assert {"model.remat", "model.compute_dtype", "model.init_from", "model.moe.balance_coef",
            "model.mamba.chunk_size", "model.attention_impl", "model.projection"
            } <= params_free - resumable
    for field in ("model.d_model", "model.layer_pattern", "optim.lr", "train.seed",
                  "train.batch_size", "data.source", "model.moe.n_experts"):
        assert field not in params_free, field
    a, b = config.load(None, ["model.moe.balance_coef=0.1"]), config.load(None)
    assert config.first_difference(a.to_dict(), b.to_dict(), params_free) is None
    assert config.first_difference(a.to_dict(), b.to_dict(), resumable) == (
        "model.moe.balance_coef", 0.1, 0.01)
