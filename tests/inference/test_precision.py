"""Precision choices: the training precisions refused or warned about (16-true, bf16 where it is emulated), compile
with a fused backward, the VAE's attention in SDPA's 4-D layout, half-precision frozen weights in LoRA runs, and
half-precision weights at sampling with a float32 noise schedule."""
import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.nn import functional as F

import ldm.controlnet.options
import ldm.eval.generation
import ldm.inference.txt2img
import ldm.inference.precision
from ldm.checkpoint import read_lora, save_weights
from ldm.config import load_config
from ldm.eval.compare import ModelSpec
from ldm.eval.generation import SampleSettings, sample_model
from ldm.inference.loading import load_model, precision_scope, weights_dtype
from ldm.inference.precision import check_training_precision
from ldm.lora.layers import base_state_dict, is_lora_key
from ldm.modules.controlnet import ControlNet
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.schedule import SCHEDULE_BUFFERS
from ldm.util import UserError, instantiate_from_config
from tests.controlnet.test_controlnet import PREFIX, TINY_CONTROLNET
from tests.controlnet.test_controlnet_sampling import SAMPLING, shapes_image, txt2img
from tests.helpers.models import randomise_zero_init
from tests.helpers.repo import REPO, TINY_CONFIG, load_script
from tests.helpers.runs import fresh_run_args, make_class_images, make_photos
from tests.training.test_memory_savers import PairData, finetune_model

LORA_CONFIG = "configs/tiny/v1-finetune_lora.yaml"


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """CUDA queries answering as a GPU of `capability` would (torch's rule: native bf16 from 8.0)."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_16_true_is_refused_naming_16_mixed_and_bf16_true(device):
    with pytest.raises(UserError, match="16-true.*use --precision 16-mixed.*or bf16-true"):
        check_training_precision(torch.device(device), "16-true")


def test_main_refuses_16_true_with_one_error_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # main's seed_everything sets them: restored after the test
        monkeypatch.setenv(name, "0")
    main = load_script("dreambooth_main", REPO / "main.py")
    args = fresh_run_args(tiny_ckpt, make_photos(tmp_path / "instance"), make_class_images(tmp_path / "class", 1),
                          tmp_path / "logs", "--precision", "16-true")
    assert main.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --precision 16-true") and "16-mixed" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_a_gpu_without_native_bf16_is_refused_naming_what_to_use(monkeypatch, precision):
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(UserError, match=rf"--precision {precision}: this GPU \(Tesla T4, compute capability 7.5\) "
                                        r"has no native bfloat16.*16-mixed \(without --fused_backward\).*"
                                        r"--precision 32"):
        check_training_precision(torch.device("cuda", 0), precision)


@pytest.mark.parametrize("capability, precision", [((8, 0), "bf16-true"), ((9, 0), "bf16-mixed"),
                                                   ((7, 5), "16-mixed"), ((6, 1), "32-true")])
def test_what_a_gpu_computes_natively_is_accepted(monkeypatch, capability, precision):
    fake_gpu(monkeypatch, capability, "some GPU")
    check_training_precision(torch.device("cuda", 0), precision)


@pytest.mark.parametrize("precision, native, warned", [("bf16-true", False, True), ("bf16-mixed", False, True),
                                                       ("bf16-true", True, False), ("32-true", False, False)])
def test_bf16_on_a_cpu_that_emulates_it_is_named_with_the_way_out(monkeypatch, caplog, precision, native, warned):
    monkeypatch.setattr(ldm.inference.precision, "cpu_has_bf16", lambda: native)
    trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
    check_training_precision(trainer.strategy.root_device, str(trainer.precision))
    assert ("bf16 is emulated here" in caplog.text and "--precision 32" in caplog.text) == warned


def test_compile_with_a_fused_backward_is_refused():
    model = finetune_model(compile_unet=True, optimizer={"fused_backward": True})
    model.trainer = SimpleNamespace(accumulate_grad_batches=1, gradient_clip_val=None, precision="bf16-true",
                                    world_size=1, max_steps=1)  # what configure_optimizers reads of a Trainer
    with pytest.raises(UserError, match=r"fused_backward \(--fused_backward\) does not work with compile_unet "
                                        r"\(--compile: .*save nothing"):
        model.configure_optimizers()
    model.compile_unet = False
    model.configure_optimizers()


def test_the_vae_attention_gives_sdpa_a_head_dimension_and_the_same_result(monkeypatch):
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    assert sorted(block.state_dict()) == sorted(f"{m}.{p}" for m in ("norm", "q", "k", "v", "proj_out")
                                                for p in ("weight", "bias"))
    x = torch.randn(2, 64, 6, 5)
    shapes, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: shapes.append(q.shape) or sdpa(q, k, v))
    with torch.no_grad():
        out = block(x)
        h = block.norm(x)
        q, k, v = (proj(h).reshape(2, 64, 30) for proj in (block.q, block.k, block.v))
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(64), dim=-1)  # the CompVis formula: [B, HW, HW]
        expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 64, 6, 5))
    assert shapes == [torch.Size([2, 1, 30, 64])]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def lora_model(text_encoder: bool = False, **params):
    config = OmegaConf.load(LORA_CONFIG)
    config.model.params.update(params)
    config.model.params.lora.text_encoder = config.model.params.cond_stage_trainable = text_encoder
    model = randomise_zero_init(instantiate_from_config(config.model))  # every LoRA module gets a gradient
    model.inject_lora(model.unet_params)
    model.learning_rate = 1e-4
    return model


def dtypes(module: torch.nn.Module, lora: bool) -> set[torch.dtype]:
    """The dtypes of a module's LoRA weights (`lora`) or of its other floating-point weights."""
    return {p.dtype for name, p in module.named_parameters() if is_lora_key(name) == lora and p.is_floating_point()}


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("precision, device, frozen, text_encoder, vae, base", [
    ("16-mixed", "cuda", "auto", False, F16, F16), ("16-mixed", "cuda", "auto", True, F16, F16),
    ("bf16-mixed", "cuda", "auto", False, BF16, BF16),
    ("bf16-mixed", "cpu", "auto", True, BF16, F32),  # the CPU keeps today's float32 base under auto
    ("bf16-mixed", "cpu", "bf16", False, BF16, BF16), ("32-true", "cuda", "auto", True, F32, F32)])
def test_a_lora_run_stores_its_frozen_base_in_half_precision_and_its_lora_in_float32(precision, device, frozen,
                                                                                    text_encoder, vae, base):
    model = lora_model(text_encoder, frozen_precision=frozen)
    model.trainer = SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device(device)))
    model.setup("fit")  # a fake accelerator: setup decides, nothing moves
    assert dtypes(model.model, lora=False) == {base} and model.unet_dtype == base
    assert dtypes(model.cond_stage_model, lora=False) == {base if text_encoder else vae}
    assert dtypes(model.first_stage_model, lora=False) == {vae}
    assert dtypes(model.model, lora=True) == {F32}
    assert dtypes(model.cond_stage_model, lora=True) == ({F32} if text_encoder else set())
    assert {p.dtype for p in model.trainable_parameters()} == {F32}


def test_lora_trains_in_float32_on_a_bf16_base_and_saves_float32_lora_weights(tmp_path):
    model = lora_model(frozen_precision="bf16")
    base = {k: v.clone() for k, v in base_state_dict(model).items()}
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(PairData(), batch_size=1))
    assert dtypes(model.model, lora=False) == {torch.bfloat16} and dtypes(model.model, lora=True) == {torch.float32}
    assert all(torch.equal(v.to(base[k].dtype), base[k].to(v.dtype).to(base[k].dtype))
               for k, v in base_state_dict(model).items())  # the base is the same weights, rounded once
    model.save_lora_file(tmp_path / "lora.safetensors")
    tensors, _ = read_lora(tmp_path / "lora.safetensors")
    assert {t.dtype for k, t in tensors.items() if k.endswith(".weight")} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))  # it trained


@pytest.mark.parametrize("precision, device, dtype", [
    ("autocast", "cuda", F16), ("bf16", "cuda", BF16), ("full", "cuda", F32),
    ("autocast", "cpu", F32), ("bf16", "cpu", BF16), ("full", "cpu", F32), ("autocast", "mps", F32)])
def test_the_sampling_weights_are_half_precision_on_a_gpu_unless_full(precision, device, dtype):
    assert weights_dtype(precision, torch.device(device)) == dtype


def test_sampling_in_bf16_on_a_gpu_without_native_bf16_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(UserError, match=r"--precision bf16: this GPU \(Tesla T4, .*\) has no native bfloat16; use "
                                        "--precision autocast"):
        precision_scope("bf16", torch.device("cuda", 0))


def test_a_sampling_model_holds_half_weights_on_a_float32_noise_schedule(tiny_ckpt):
    config = load_config(str(TINY_CONFIG))
    full = load_model(config, str(tiny_ckpt), torch.device("cpu"), precision="full")
    half = load_model(config, str(tiny_ckpt), torch.device("cpu"), precision="bf16")
    for part in ("model", "first_stage_model", "cond_stage_model"):
        assert dtypes(getattr(half, part), lora=False) == {BF16} and dtypes(getattr(full, part), lora=False) == {F32}
    assert half.unet_dtype == BF16
    for name in SCHEDULE_BUFFERS:
        assert getattr(half, name).dtype == F32 and torch.equal(getattr(half, name), getattr(full, name))
    weight = "model.diffusion_model.out.2.weight"
    assert torch.equal(half.state_dict()[weight], full.state_dict()[weight].to(BF16))  # the file's, rounded once


def test_txt2img_with_a_controlnet_samples_with_bf16_weights(tiny_ckpt, tmp_path, monkeypatch):
    control, image = tmp_path / "control_tiny.pth", tmp_path / "shapes.png"
    save_weights({PREFIX + k: v for k, v in ControlNet(**TINY_CONTROLNET).state_dict().items()}, control)
    shapes_image().save(image)
    seen = {}

    def spy(module, name: str):
        load = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: seen.setdefault(name, load(*a, **k)))
    spy(ldm.inference.txt2img, "load_model")
    spy(ldm.controlnet.options, "load_controlnet")
    outdir = tmp_path / "out"
    assert txt2img.main([*SAMPLING, "--ckpt", str(tiny_ckpt), "--outdir", str(outdir), "--precision", "bf16",
                         "--controlnet", str(control), "--control_image", str(image), "--ddim_steps", "2",
                         "--H", "32", "--W", "32"]) == 0  # small: a CPU without AVX-512 convolves bf16 slowly
    assert seen["load_model"].unet_dtype == BF16 and seen["load_model"].alphas_cumprod.dtype == F32
    assert {p.dtype for p in seen["load_controlnet"].parameters()} == {BF16}
    sample = np.asarray(Image.open(outdir / "samples" / "00000.png"))
    assert sample.shape == (32, 32, 3) and sample.std() > 0


def test_evaluate_and_compare_sample_with_the_precision_they_are_given(tiny_ckpt, tmp_path, monkeypatch):
    seen = []

    def spy(model, prompt, seeds, *args, **kwargs):  # what the sampler would run with (the sampling: txt2img's test)
        seen.append((model.unet_dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return [Image.new("RGB", (64, 64))] * len(seeds)
    monkeypatch.setattr(ldm.eval.generation, "sample_images", spy)
    for precision, expected in (("bf16", (BF16, True, BF16)), ("autocast", (F32, False, BF16))):
        settings = SampleSettings([0, 1], steps=2, config=str(TINY_CONFIG), precision=precision)
        sample_model(ModelSpec.parse(str(tiny_ckpt)), settings, ["a dog"], torch.device("cpu"), tmp_path / precision)
        assert seen.pop() == expected
