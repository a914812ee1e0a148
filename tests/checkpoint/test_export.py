"""Half-precision export: `--save_precision` for the step files of a run (last.ckpt stays full precision), and
scripts/prune_ckpt.py, which turns resumable and full-EMA files into weights-only SD v1 files (a run and a prune end to
end: tests/e2e/test_export_e2e.py)."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm.callbacks import StepCheckpoint
from ldm.checkpoint import (UNET_PREFIX, ema_key, export_weights, group_of, load_model_weights, read_state_dict,
                            save_checkpoint, save_weights)
from ldm.config import load_config
from ldm.inference.loading import load_model
from ldm.inference.sampling import sample_images
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import REPO, TINY_CONFIG, load_script
from tests.helpers.runs import fresh_run_args, make_class_images, make_photos

CPU = torch.device("cpu")


def is_weight(key: str, value: torch.Tensor) -> bool:
    """A floating-point model weight, which a precision applies to (the noise schedule keeps its own)."""
    return value.is_floating_point() and group_of(key) != "noise schedule"


def assert_precision(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: torch.dtype):
    """`state` holds `reference`'s tensors: the weights cast to `dtype`, everything else bit for bit."""
    assert set(state) == set(reference)
    for key, value in reference.items():
        expected = value.to(dtype) if is_weight(key, value) else value
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key


def test_by_default_step_files_keep_the_models_precision_and_copies_are_fp16(tmp_path):
    model = build_tiny_model(use_ema=True)  # with an int32 buffer, model_ema.num_updates
    callback = StepCheckpoint(str(tmp_path), every_n_train_steps=1, safetensors=True)
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, optimizers=[])
    callback.save_weights(trainer, model, tmp_path / "step_3.ckpt")
    state = model.state_dict()
    saved = torch.load(tmp_path / "step_3.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert {v.dtype for v in saved.values()} == {torch.float32, torch.int32}
    assert all(saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in state.items())
    assert_precision(load_file(tmp_path / "step_3.safetensors"), state, torch.float16)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                              ("fp32", torch.float32)])
def test_save_precision_casts_the_floating_point_weights_only(tmp_path, precision, dtype):
    model = build_tiny_model(use_ema=True)
    model.model_ema.decay.data = model.model_ema.decay.double()  # a float64 tensor, so that fp32 casts something
    callback = StepCheckpoint(str(tmp_path), every_n_train_steps=1, safetensors=True, save_precision=precision)
    trainer = SimpleNamespace(is_global_zero=True, global_step=1, optimizers=[])
    callback.save_weights(trainer, model, tmp_path / "step_1.ckpt")
    for name in ("step_1.ckpt", "step_1.safetensors"):
        state = read_state_dict(tmp_path / name)
        assert_precision(state, model.state_dict(), dtype)
        assert state["model_ema.num_updates"].dtype == torch.int32 and state["betas"].dtype == torch.float32


@pytest.fixture(scope="module")
def fp32_and_fp16(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One set of weights as fp32 .ckpt, and exported from it as fp16 .ckpt and .safetensors."""
    folder = tmp_path_factory.mktemp("precisions")
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), folder / "fp32.ckpt")
    for name in ("fp16.ckpt", "fp16.safetensors"):
        export_weights(folder / "fp32.ckpt", folder / name, torch.float16)
    return folder / "fp32.ckpt", folder / "fp16.ckpt", folder / "fp16.safetensors"


def test_fp16_export_samples_like_fp32_up_to_rounding(fp32_and_fp16):
    """Same seed, same DDIM steps: fp16 weights move pixels by a few levels, another seed moves them by a lot."""
    fp32, fp16_ckpt, fp16_safetensors = fp32_and_fp16
    config = load_config(str(TINY_CONFIG))
    full = load_model(config, str(fp32), CPU)
    half = load_model(config, str(fp16_safetensors), CPU)
    weights = full.model.diffusion_model.out[2].weight
    assert torch.equal(half.model.diffusion_model.out[2].weight, weights.half().float())
    assert not torch.equal(half.model.diffusion_model.out[2].weight, weights)
    assert torch.equal(half.alphas_cumprod, full.alphas_cumprod)
    pixels = [np.asarray(sample_images(model, "a photo of sks dog", [seed], steps=4, scale=5.0)[0], dtype=np.int16)
              for model, seed in ((full, 1), (half, 1), (full, 2))]
    rounding, other_seed = np.abs(pixels[1] - pixels[0]), np.abs(pixels[2] - pixels[0])
    # measured: fp16 at most 1 level of 255 (mean 0.02; bf16 2 and 0.2), another seed 255 (mean 41)
    assert rounding.max() <= 3 and rounding.mean() < 0.1 and other_seed.mean() > 10, (rounding.max(), rounding.mean())
    report = load_model_weights(build_tiny_model(), fp16_ckpt)
    assert report.loaded["UNet"] == len(list(full.model.diffusion_model.state_dict()))


@pytest.mark.parametrize("index", [1, 2], ids=["ckpt", "safetensors"])
def test_fp16_export_loads_in_diffusers_from_single_file(fp32_and_fp16, index):
    diffusers = pytest.importorskip("diffusers")
    path = fp32_and_fp16[index]
    ours = load_model(load_config(str(TINY_CONFIG)), str(fp32_and_fp16[0]), CPU)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), original_config=str(TINY_CONFIG), text_encoder=ours.cond_stage_model.transformer.text_model,
        tokenizer=ours.cond_stage_model.tokenizer, safety_checker=None, feature_extractor=None,
        local_files_only=True)
    state = read_state_dict(path)
    for module, key in ((pipe.unet.conv_out.weight, "model.diffusion_model.out.2.weight"),
                        (pipe.unet.conv_in.weight, "model.diffusion_model.input_blocks.0.0.weight"),
                        (pipe.vae.decoder.conv_out.weight, "first_stage_model.decoder.conv_out.weight")):
        assert state[key].dtype == torch.float16 and torch.equal(module.detach().to(torch.float16), state[key]), key


@pytest.fixture
def full_ema_ckpt(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file as sd-v1-4-full-ema.ckpt: the weights, EMA copies (unlike the UNet's) and some training state."""
    state = build_tiny_model(use_ema=True).state_dict()
    g = torch.Generator().manual_seed(5)
    for key, value in state.items():
        if key.startswith("model_ema.diffusion_model"):
            value.normal_(generator=g)
    save_checkpoint({"state_dict": state, "global_step": 470000, "epoch": 5}, tmp_path / "full-ema.ckpt")
    return tmp_path / "full-ema.ckpt", state


@pytest.mark.parametrize("ema", [True, False])
def test_prune_ema_puts_the_ema_weights_in_the_unets_keys(full_ema_ckpt, tmp_path, capsys, ema):
    source, state = full_ema_ckpt
    out = tmp_path / "pruned.safetensors"
    status = load_script("prune_ckpt").main([str(source), "-o", str(out)] + ["--ema"] * ema)
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and len(lines) == 1 and "left out 288 EMA tensors" in lines[0], lines
    assert ("UNet from the EMA weights" in lines[0]) == ema
    pruned = load_file(out)
    assert not any(k.startswith("model_ema.") for k in pruned)
    assert set(pruned) == {k for k in state if not k.startswith("model_ema.")}
    for key, value in pruned.items():
        from_ema = ema and key.startswith(UNET_PREFIX)
        assert torch.equal(value, state[ema_key(key) if from_ema else key]), key
    unet_key = UNET_PREFIX + "out.2.weight"
    assert not torch.equal(state[unet_key], state[ema_key(unet_key)])  # the two are told apart


def bad_input(tmp_path: Path, kind: str, good: Path) -> list[str]:
    """prune_ckpt.py arguments with one mistake in them."""
    out = str(tmp_path / "out.ckpt")
    if kind == "missing":
        return [str(tmp_path / "nope.ckpt"), "-o", out]
    if kind == "precision":
        return [str(good), "-o", out, "--precision", "fp8"]
    if kind == "suffix":
        return [str(good), "-o", str(tmp_path / "out.bin")]
    if kind == "same":
        return [str(good), "-o", str(good)]
    if kind == "no_ema":
        return [str(good), "-o", out, "--ema"]
    state = build_tiny_model().state_dict()
    if kind == "nan":
        state["model.diffusion_model.out.2.bias"][0] = float("nan")
    else:  # a VAE-less file, such as a LoRA or a UNet-only export
        state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    save_weights(state, tmp_path / f"{kind}.ckpt")
    return [str(tmp_path / f"{kind}.ckpt"), "-o", out]


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found: "),
    ("precision", "--precision 'fp8' is not a precision: use one of fp16, bf16, fp32"),
    ("suffix", "out.bin: the output must end in .ckpt or .safetensors"),
    ("same", "is the input file; write the pruned weights to another file"),
    ("no_ema", "the file has no EMA weights for 286 of 286 UNet tensors"),
    ("nan", "tensor model.diffusion_model.out.2.bias holds 1 NaN or inf values"),
    ("no_vae", "has no VAE weights (first_stage_model.*); is it a full SD v1 checkpoint?"),
])
def test_prune_bad_inputs_are_one_line_errors(tiny_ckpt, tmp_path, capsys, kind, message):
    status = load_script("prune_ckpt").main(bad_input(tmp_path, kind, tiny_ckpt))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not captured.out and not (tmp_path / "out.ckpt").exists() and not (tmp_path / "out.bin").exists()


def test_main_refuses_an_unknown_save_precision_in_one_line(tmp_path, tiny_ckpt, capsys):
    spec = importlib.util.spec_from_file_location("dreambooth_main", REPO / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    photos, reg = make_photos(tmp_path / "instance"), make_class_images(tmp_path / "class", 1)
    status = main.main(fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", "--save_precision", "fp8"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and lines == ["error: save_precision 'fp8' is not a precision: use one of fp16, bf16, fp32"]
    assert not (tmp_path / "logs").exists()
