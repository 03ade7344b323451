"""Hugging Face interop against transformers itself (the independent reference).

Each family is a tiny randomly initialised transformers model saved to disk. After
`import-hf`, our logits equal transformers' within 1e-4 of the logit scale (max |logit|), for the
scanned stack on a 2x2x2 (data, fsdp, tensor) mesh of 8 virtual devices and the unscanned stack;
importing then exporting gives back every tensor bit for bit; a trained run exported is loaded by
`AutoModelForCausalLM`/`AutoTokenizer` and gives our logits and our greedy tokens. Refusals: one
line naming the field, exit code 2, nothing written.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from research.cli import main  # noqa: E402
from research.config import ConfigError  # noqa: E402
from research.generate import generate  # noqa: E402
from research.interop import hf  # noqa: E402
from research.interop.cli import export_hf  # noqa: E402
from research.train.checkpoint import Checkpointer  # noqa: E402
from research.train.loop import prepare, train
from research.train.rundir import RunDir  # noqa: E402

TOL = 1e-4
SMALL = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, tie_word_embeddings=False)
ATTN = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, **ATTN, rope_theta=500.0),
    "llama_tied": lambda: transformers.LlamaConfig(**{**SMALL, "tie_word_embeddings": True},
                                                   **ATTN),
    "mistral": lambda: transformers.MistralConfig(**SMALL, **ATTN, sliding_window=5),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, **ATTN, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "mamba2": lambda: transformers.Mamba2Config(**SMALL, state_size=8, head_dim=8, expand=2,
                                                n_groups=2, num_heads=8, chunk_size=4),
}
# No token is dropped at capacity factor E / top_k: the forward is the same function as Mixtral's.
EXTRA = {"mixtral": ["model.moe.capacity_factor=2.0"]}
TOKENS = np.random.default_rng(0).integers(0, 257, (2, 12))
SHARDED = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def hf_logits(model_dir, tokens=TOKENS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(run_dir, tokens=TOKENS, step=None) -> np.ndarray:
    cfg = RunDir(run_dir).config()
    setup = prepare(cfg)
    with setup.context():
        state, _ = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True).restore(
            step, setup.spec.abstract)
        logits, _ = jax.jit(setup.model.apply)({"params": state["params"]}, jnp.asarray(tokens))
    return np.asarray(logits)


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    vocab = theirs.shape[-1]  # our rows beyond the HF vocabulary are padding
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours[..., :vocab], theirs, rtol=0, atol=TOL * scale)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for family, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make())
        with torch.no_grad():  # norms and Mamba's D start at 1: randomise them so a swap shows
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
        out[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(out[family])
    return out


def load_imported(family: str, hf_dir, overrides: list[str]):
    """(setup, params) of an HF folder, loaded straight into the mesh's shardings."""
    from research import config

    raw = {"model": hf.model_from_hf(hf.read_config(hf_dir))}
    cfg = config.validate(config.apply_overrides(raw, [*overrides, *EXTRA.get(family, [])]))
    setup = prepare(cfg)
    with setup.context():
        return setup, hf.load_params(hf_dir, cfg.model, setup.spec.abstract["params"])


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_imported_logits_match_transformers(family, hf_dirs, token_cache_dir):
    theirs = hf_logits(hf_dirs[family])
    variants = [["model.scan_layers=true", *SHARDED], ["model.scan_layers=false"]]
    if family == "mixtral":  # both dispatch paths are Mixtral's function when nothing drops
        variants.append(["model.scan_layers=false", "model.moe.dispatch=dropless"])
    for overrides in variants:
        setup, params = load_imported(family, hf_dirs[family],
                                      [f"data.cache_dir={token_cache_dir}", *overrides])
        if "mesh.tensor=2" in overrides:  # each device got a quarter of the table (fsdp x tensor)
            table = params["embed"]["embedding"]
            assert table.addressable_shards[0].data.size * 4 == table.size
        with setup.context():
            logits, _ = jax.jit(setup.model.apply)({"params": params}, jnp.asarray(TOKENS))
        assert_close(np.asarray(logits), theirs)


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_mapping_round_trip_is_exact(family, scanned, hf_dirs):
    """HF tensors -> our tree -> HF tensors, bit for bit (pure numpy, no model)."""
    from research import config

    original = load_file(str(hf_dirs[family] / "model.safetensors"))
    raw = {"model": hf.model_from_hf(hf.read_config(hf_dirs[family]))}
    cfg = config.validate(config.apply_overrides(raw, [f"model.scan_layers={scanned}"])).model
    ours = dict(hf.hf_to_params(cfg, 300, original.__getitem__))
    back = dict(hf.params_to_hf(cfg, 300, ours.__getitem__))
    expected = {k: v for k, v in original.items()
                if k != "lm_head.weight" or not cfg.tie_embeddings}
    assert back.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)


def test_import_export_commands_round_trip(hf_dirs, tmp_path):
    """The commands end to end (Mixtral: the most tensors, plus a tokenizer.json): config.yaml,
    the copied tokenizer and a step-0 checkpoint that `export-hf` turns back into the same
    tensors, config and tokenizer."""
    hf_dir, run_dir, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).symlink_to(hf_dirs["mixtral"] / name)
    (hf_dir / "tokenizer.json").write_text(hf.byte_tokenizer_json())
    docs = tmp_path / "docs.jsonl"  # a small corpus, so the new tokenizer's cache builds fast
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(200)))
    assert main(["import-hf", str(hf_dir), "--run-dir", str(run_dir), f"data.source={docs}",
                 "data.heldout_percent=10", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.batch_size=8", "train.seq_len=32", "model.scan_layers=false"]) == 0
    assert RunDir(run_dir).config().data.tokenizer == str(run_dir.resolve() / "tokenizer.json")
    assert RunDir(run_dir).config().model.moe.n_experts == 4
    assert main(["export-hf", str(run_dir), "--out", str(out)]) == 0
    original = load_file(str(hf_dirs["mixtral"] / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    (tmp_path / "sharded").mkdir()
    hf.write_safetensors(exported, tmp_path / "sharded", max_shard_bytes=10_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    read = hf.SafetensorsReader(tmp_path / "sharded")  # what import-hf reads sharded folders with
    assert all(np.array_equal(read(name), array) for name, array in exported.items())
    assert exported.keys() == original.keys()
    for name, array in original.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    theirs = json.loads((hf_dirs["mixtral"] / "config.json").read_text())
    ours = json.loads((out / "config.json").read_text())
    shared = {k for k in ours if theirs.get(k) is not None and not k.endswith("token_id")} - {
        "torch_dtype", "max_position_embeddings"}
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert (out / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()


def test_generate_from_an_imported_run_starts_prompts_as_its_tokenizer_does(hf_dirs, tmp_path):
    """A Llama folder whose tokenizer puts a BOS (<s>, 257) before a text: import-hf records it
    (data.document_start), the token cache writes it before each document, and `generate`
    starts the prompt with it, so greedy tokens equal transformers' for the same prompt. Runs
    trained here keep this framework's eos; a folder without tokenizer.json: its config's BOS."""
    from tokenizers import Tokenizer, processors

    from research import generate as gen
    from research.data.tokenizer import ByteTokenizer

    hf_dir, run_dir = tmp_path / "hf", tmp_path / "run"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).symlink_to(hf_dirs["llama"] / name)
    tok = Tokenizer.from_str(hf.byte_tokenizer_json())
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
         "eos_token": "<|endoftext|>"}))
    docs = tmp_path / "docs.jsonl"  # a small corpus, so the new tokenizer's cache builds fast
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(100)))
    assert main(["import-hf", str(hf_dir), "--run-dir", str(run_dir), f"data.source={docs}",
                 "data.heldout_percent=10", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.batch_size=8", "train.seq_len=32"]) == 0
    assert RunDir(run_dir).config().data.document_start == 257

    setup, params, _ = gen.load(run_dir)
    tokens = np.asarray(setup.data.caches["main"].train)
    assert tokens[0] == 257 and np.all(tokens[1:][tokens[:-1] == 256] == 257)  # <s> doc eos <s> ...
    text = "def f(x):"
    prompt = gen.prompt_tokens(setup.cfg.data.document_start, setup.data.tokenizer, text)
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert prompt == theirs_tokenizer(text)["input_ids"] == [257, *text.encode()]
    with setup.context():
        ours = gen.generate(setup.model, params, prompt, 8, temperature=0.0, eos_id=256,
                            vocab_limit=setup.data.tokenizer.vocab_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                            eos_token_id=256, pad_token_id=256,  # ids past the tokenizer: never
                            suppress_tokens=list(range(258, 300)))[0, len(prompt):].tolist()
    assert ours == theirs

    assert gen.prompt_tokens("eos", ByteTokenizer(), "ab") == [256, 97, 98]
    assert [hf.document_start(c, None, 256) for c in ({"bos_token_id": 1}, {"bos_token_id": 256},
                                                       {"bos_token_id": None})] == [1, "eos", "none"]
    with pytest.raises(ConfigError, match="--prompt: empty"):
        gen.prompt_tokens("none", ByteTokenizer(), "")


def architecture(hf_dir) -> list[str]:
    """The model overrides an experiment needs to start from `hf_dir` (model.init_from)."""
    from flax.traverse_util import flatten_dict

    model = hf.model_from_hf(hf.read_config(hf_dir))
    return [f"model.{k}={json.dumps(v)}" for k, v in flatten_dict(model, sep=".").items()]


LR = 1e-3  # Adam moves a weight by at most ~LR a step (exactly LR at its first): see below


@pytest.fixture(scope="module")
def trained(hf_dirs, tmp_path_factory, token_cache_dir):
    """A tiny tied-embedding Llama run (byte tokenizer) started with model.init_from from the
    HF folder and trained for 6 steps (checkpoints and held-out losses at 3 and 6) at lr LR."""
    from research import config
    from conftest import TINY

    run_dir = tmp_path_factory.mktemp("trained")
    cfg = config.load(None, [*TINY, f"data.cache_dir={token_cache_dir}",
                             *architecture(hf_dirs["llama_tied"]), "checkpoint.keep_last=3",
                             f"model.init_from={hf_dirs['llama_tied']}", f"optim.lr={LR}"])
    train(cfg, run_dir)
    return run_dir


def test_export_all_steps_command_gives_each_step_its_model_and_card(trained, tmp_path):
    """`export-hf --all-steps`: one folder per kept step, each loaded by transformers with that
    step's logits (steps 3 and 6 apart by far more than the tolerance) and a card naming that
    step, its tokens and its held-out loss."""
    out = tmp_path / "trajectory"
    assert main(["export-hf", str(trained), "--all-steps", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["step_0000003", "step_0000006"]
    eval_loss = {row["step"]: row["eval_loss"] for row in RunDir(trained).metrics()
                 if "eval_loss" in row}
    theirs = {}
    for step in (3, 6):
        folder = out / f"step_{step:07d}"
        theirs[step] = hf_logits(folder)
        assert_close(our_logits(trained, step=step), theirs[step])
        card = (folder / "README.md").read_text()
        assert f"| step | {step} |" in card and f"tokens seen | {step * 8 * 32:,} |" in card
        assert f"| held-out loss | {eval_loss[step]:.4f} nats/token |" in card
    assert np.abs(theirs[6] - theirs[3]).max() > 100 * TOL * np.abs(theirs[6]).max()


def test_exported_trained_run_loads_in_transformers(trained, tmp_path):
    final = tmp_path / "final"
    assert export_hf(trained, final, None, False, False, max_shard_bytes=40_000) == [6]
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # transformers reads the sharded form
    assert_close(our_logits(trained), hf_logits(final))

    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    text = "Hello, wörld!"
    assert tokenizer(text)["input_ids"] == list(text.encode())
    assert tokenizer.eos_token_id == 256

    prompt = [256, *text.encode()]
    setup = prepare(RunDir(trained).config())
    with setup.context():
        state, _ = Checkpointer(trained / "checkpoints", setup.cfg.checkpoint,
                                read_only=True).restore(None, setup.spec.abstract)
        ours = generate(setup.model, state["params"], prompt, 6, temperature=0.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=256)[0, len(prompt):].tolist()
    assert ours == theirs


@pytest.mark.parametrize("family", ["mistral", "mixtral", "mamba2"])
def test_trained_runs_of_each_family_export_to_transformers(family, hf_dirs, tmp_path,
                                                             token_cache_dir):
    """Started from the family's folder (randomised norms, so a swap shows), trained 2 steps,
    exported by the command: transformers' logits of the export are ours."""
    from research import config
    from conftest import TINY

    run_dir, out = tmp_path / "run", tmp_path / "out"
    settings = [o for o in TINY if not o.startswith("model.")]
    train(config.load(None, [*settings, f"data.cache_dir={token_cache_dir}",
                             *architecture(hf_dirs[family]), *EXTRA.get(family, []),
                             f"model.init_from={hf_dirs[family]}", "optim.warmup_steps=0",
                             "train.steps=2", "checkpoint.every=2", "train.eval_every=2"]), run_dir)
    assert main(["export-hf", str(run_dir), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    theirs = hf_logits(out)
    assert_close(our_logits(run_dir), theirs)
    assert np.abs(theirs - hf_logits(hf_dirs[family])).max() > 10 * TOL * np.abs(theirs).max()


def test_export_refuses_to_overwrite_and_names_missing_steps(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export-hf", str(trained), "--out", str(out)]) == 2
    assert main(["export-hf", str(trained), "--step", "4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --out:") and "--force" in err[0]
    assert err[1].startswith("error: --step:") and "[3, 6]" in err[1]
    assert list(out.iterdir()) == [] and not (tmp_path / "x").exists()
    assert main(["export-hf", str(trained), "--step", "3", "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize("overrides, field", [
    (["model.layer_pattern=[attention:mlp, mamba:none]"], "model.layer_pattern"),
    (["model.layer_pattern=[attention:moe]", "model.moe.n_shared_experts=1"],
     "model.moe.n_shared_experts"),
    (["model.parameterization=completep", "model.base_d_model=16"], "model.parameterization"),
    (["model.qk_norm=true"], "model.qk_norm"),
])
def test_export_refuses_configs_no_hf_class_expresses(overrides, field, tmp_path, capsys):
    from research import config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = config.load(None, ["model.d_model=32", "model.mamba.head_dim=16", *overrides])
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    assert main(["export-hf", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {field}=")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_import_refuses_unsupported_hf_configs(change, field, hf_dirs, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = json.loads((hf_dirs["llama"] / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    (hf_dir / "model.safetensors").symlink_to(hf_dirs["llama"] / "model.safetensors")
    assert main(["import-hf", str(hf_dir), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f" {field}=" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "index"])
def test_import_refuses_a_damaged_safetensors_file(damage, hf_dirs, tmp_path, capsys):
    """A download cut short, a file that is not safetensors, a broken shard index: one line
    naming the file, exit code 2, nothing written."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").symlink_to(hf_dirs["llama"] / "config.json")
    weights = (hf_dirs["llama"] / "model.safetensors").read_bytes()
    damaged = {"truncated": ("model.safetensors", weights[: len(weights) // 2]),
               "header": ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + weights[24:]),
               "index": ("model.safetensors.index.json", b'{"weight_map": ')}[damage]
    if damage == "index":
        (hf_dir / "model.safetensors").write_bytes(weights)
    (hf_dir / damaged[0]).write_bytes(damaged[1])
    assert main(["import-hf", str(hf_dir), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {hf_dir / damaged[0]}: ") and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_hf_folder_starts_a_run_from_its_weights(trained, hf_dirs, tmp_path):
    """model.init_from: the run starts from the HF weights; a model section that differs is
    refused naming the field, before anything is written."""
    from flax.traverse_util import flatten_dict

    cfg = RunDir(trained).config()
    with pytest.raises(ConfigError, match=r"^model.d_ff=48 differs from 64 in model.init_from="):
        train(cfg.model_copy(update={"model": cfg.model.model_copy(update={"d_ff": 48})}),
              tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    setup = prepare(cfg)
    with setup.context():
        state, _ = Checkpointer(trained / "checkpoints", cfg.checkpoint,
                                read_only=True).restore(3, setup.spec.abstract)
    leaves = flatten_dict(jax.device_get(state["params"]))
    ours = dict(hf.params_to_hf(cfg.model, 300, leaves.__getitem__))
    original = load_file(str(hf_dirs["llama_tied"] / "model.safetensors"))
    assert ours.keys() == original.keys()
    # Adam's bias-corrected step |m/sqrt(v)| is at most 1 in the first 3 steps (beta1 0.9, beta2
    # 0.95), and the warmup makes step 1's lr 0: 3 steps move a weight by less than 3 LR (plus
    # decoupled weight decay, lr x 0.1 x |w| each), while the folder's weights have std 0.02.
    for name, array in original.items():
        np.testing.assert_allclose(ours[name], array, rtol=0, atol=3 * LR * 1.01, err_msg=name)


def test_an_experiment_trains_an_imported_run_with_its_own_settings(hf_dirs, tmp_path,
                                                                     token_cache_dir):
    """`research train X.yaml --run-dir IMPORTED` trains the imported weights with the
    experiment's data, optimizer and schedule (a step-0 run directory is a starting point);
    a model section that differs is refused naming the field, and the directory is unchanged."""
    from research import config
    from conftest import TINY

    run_dir = tmp_path / "imported"
    settings = [o for o in TINY if not o.startswith("model.")] + [f"data.cache_dir={token_cache_dir}"]
    assert main(["import-hf", str(hf_dirs["llama_tied"]), "--run-dir", str(run_dir),
                 *settings]) == 0
    imported_yaml = (run_dir / "config.yaml").read_text()
    experiment = [*settings, *architecture(hf_dirs["llama_tied"])]

    refused = config.load(None, [*experiment, "model.d_ff=48"])
    with pytest.raises(ConfigError, match=r"model.d_ff is 48 here but 64 in .*config.yaml"):
        train(refused, run_dir)
    assert (run_dir / "config.yaml").read_text() == imported_yaml

    cfg = config.load(None, [*experiment, "optim.lr=1e-9", "optim.schedule=constant",
                             "train.steps=3", "checkpoint.every=3"])
    assert RunDir(run_dir).config().optim != cfg.optim  # a plain resume would refuse this
    assert train(cfg, run_dir)["step"] == 3
    assert RunDir(run_dir).config().optim == cfg.optim
    # trained from the folder's weights (at lr 1e-9 they stay within ~1e-8 of them)
    assert_close(our_logits(run_dir), hf_logits(hf_dirs["llama_tied"]))
