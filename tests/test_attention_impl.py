"""model.attention_impl and model.projection per backend: what `auto` picks (config.for_backend),
that every implementation that runs on CPU trains the same model (values and gradients at 1e-5),
and that cuDNN is refused on CPU in one line (exit 2, nothing written).

The float64 reference for the attention module itself is in test_models.py (parametrized over
the implementations); here the whole decoder is compared implementation against implementation.
"""

import jax
import pytest
from test_cli import run_cli
from test_models import VOCAB, close, init, loss_fn, tiny, tokens

from research.config import ConfigError, ModelConfig, for_backend
from research.models.decoder import Decoder


@pytest.mark.parametrize("platform, dtype, head_dim, want", [
    ("cpu", "bfloat16", 64, ("chunked", "custom")),
    ("cuda", "bfloat16", 64, ("cudnn", "plain")),
    ("cuda", "float32", 64, ("xla", "plain")),      # cuDNN's fused attention is bf16/fp16 only
    ("cuda", "bfloat16", 12, ("xla", "plain")),     # head size not a multiple of 8
    ("cuda", "bfloat16", 256, ("xla", "plain")),    # above 128
    ("rocm", "bfloat16", 64, ("xla", "plain")),
    ("tpu", "bfloat16", 64, ("xla", "plain")),
])
def test_auto_resolves_per_backend(platform, dtype, head_dim, want):
    cfg = ModelConfig(d_model=256, n_heads=4, head_dim=head_dim, compute_dtype=dtype)
    resolved = for_backend(cfg, platform)
    assert (resolved.attention_impl, resolved.projection) == want
    explicit = cfg.model_copy(update={"attention_impl": "xla", "projection": "custom"})
    assert for_backend(explicit, platform) == explicit  # a stated choice is kept


def test_cudnn_is_refused_off_nvidia_gpus_and_in_float32():
    cfg = ModelConfig(attention_impl="cudnn", compute_dtype="bfloat16")
    assert for_backend(cfg, "cuda").attention_impl == "cudnn"
    for platform in ("cpu", "tpu", "rocm"):
        with pytest.raises(ConfigError, match=f"needs an NVIDIA GPU.*backend is {platform}"):
            for_backend(cfg, platform)
    with pytest.raises(ValueError, match="attention_impl=cudnn needs model.compute_dtype=bfloat16"):
        ModelConfig(attention_impl="cudnn")


def test_implementations_train_the_same_decoder():
    """chunked and xla give the same loss and gradients for a GQA decoder with a sliding
    window, at 1e-5; auto traces to exactly chunked attention with the custom-gradient
    projections on CPU, and plain projections have no custom_vjp."""
    toks = tokens(t=13)
    params = init(Decoder(tiny(sliding_window=5), VOCAB), toks[:, :-1])  # the same for all

    def loss_and_grad(**kw):
        model = Decoder(tiny(sliding_window=5, **kw), VOCAB)
        return jax.value_and_grad(lambda p: loss_fn(model, p, toks))

    results = {impl: jax.jit(loss_and_grad(attention_impl=impl))(params)
               for impl in ("chunked", "xla")}
    close(results["xla"][0], results["chunked"][0])
    jax.tree.map(close, results["xla"][1], results["chunked"][1])

    traced = {name: str(jax.make_jaxpr(loss_and_grad(**kw))(params)) for name, kw in {
        "auto": {}, "chunked": dict(attention_impl="chunked", projection="custom"),
        "plain": dict(attention_impl="chunked", projection="plain")}.items()}
    assert traced["auto"] == traced["chunked"] and "custom_vjp" in traced["auto"]
    assert "custom_vjp" not in traced["plain"]


def test_cudnn_on_cpu_is_one_line_and_writes_nothing(tmp_path, tiny_overrides, capsys):
    run, experiment = tmp_path / "run", tmp_path / "experiment.yaml"
    experiment.write_text("{}\n")
    code, err = run_cli(capsys, "train", str(experiment), "--run-dir", str(run), *tiny_overrides,
                        "model.attention_impl=cudnn", "model.compute_dtype=bfloat16")
    assert code == 2 and err == ["error: model.attention_impl=cudnn needs an NVIDIA GPU (cuDNN); "
                                 "this JAX backend is cpu: use auto, chunked or xla"], err
    assert not run.exists()
    code, err = run_cli(capsys, "train", str(experiment), "--run-dir", str(run), *tiny_overrides,
                        "model.attention_impl=cudnn")
    assert code == 2 and len(err) == 1 and "needs model.compute_dtype=bfloat16" in err[0], err
    assert not run.exists()
