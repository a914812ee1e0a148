"""The reference side of scripts/benchmarks/train.py, run in worker processes of their own: the step that diffusers'
examples/dreambooth/train_dreambooth.py takes (its flags, batch, models and optimizer), and a UNet's forward and
backward alone (ours or diffusers'). Nothing of Lightning is imported, so that the reference's start-up holds none."""
import argparse
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ldm.checkpoint.diffusers import diffusers_unet_config
from ldm.data.personalized import CLASS_TEMPLATE, DEFAULT_CLASS_WORD, DEFAULT_IDENTIFIER, INSTANCE_TEMPLATE
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer
from ldm.util import (FLOAT32_MATMUL_PRECISION, apply_backend_settings, backend_settings, peak_memory_stats,
                      synced_clock)

PRECISIONS = {"no": None, "fp16": "float16", "bf16": "bfloat16"}  # train_dreambooth.py's --mixed_precision
N_PHOTOS = 4  # the synthetic photos of each kind (instance, class)


def reference_parser() -> argparse.ArgumentParser:
    """The flags of train_dreambooth.py that change its training step, with its defaults."""
    parser = argparse.ArgumentParser(prog="--reference_flags", allow_abbrev=False)
    add = parser.add_argument
    add("--gradient_checkpointing", action="store_true")
    add("--use_8bit_adam", action="store_true")
    add("--mixed_precision", choices=sorted(PRECISIONS), default=None)
    add("--set_grads_to_none", action="store_true")
    add("--train_text_encoder", action="store_true")
    add("--learning_rate", type=float, default=5e-6)
    add("--max_grad_norm", type=float, default=1.0)
    add("--prior_loss_weight", type=float, default=1.0)
    return parser


def peak_memory(device: Any) -> dict:
    """As ldm/callbacks/timing.py measures it (ldm.util.peak_memory_stats), with the device and torch's threads."""
    import torch
    return {**peak_memory_stats(device), "device": device.type, "torch_threads": torch.get_num_threads()}


def default_backend() -> dict[str, Any]:
    """The backend flags of a run that copies no other: main.py's TF32 matmuls, TF32 convolutions, no autotuning."""
    return {"float32_matmul_precision": FLOAT32_MATMUL_PRECISION, "cudnn_allow_tf32": True, "cudnn_benchmark": False}


def backend_text(backend: dict) -> str:
    """`TF32 matmul high, cuDNN TF32 on, autotune off`: the backend flags as the benchmarks' tables print them."""
    on = {True: "on", False: "off"}
    return (f"TF32 matmul {backend['float32_matmul_precision']}, cuDNN TF32 {on[backend['cudnn_allow_tf32']]}, "
            f"autotune {on[backend['cudnn_benchmark']]}")


def dreambooth_batch(photos: Path, step: int, size: int, tokenizer: Any) -> dict:
    """train_dreambooth.py's DreamBoothDataset item and collate_fn: an instance and a class example, each image
    resized (bilinear) and centre-cropped to `size`, in [-1, 1]; prompts padded to the tokenizer's length."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps
    pixels = []
    for kind in ("instance", "class"):
        image = ImageOps.exif_transpose(Image.open(photos / kind / f"{step % N_PHOTOS}.png")).convert("RGB")
        scale = size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
    prompts = [INSTANCE_TEMPLATE.format(identifier=DEFAULT_IDENTIFIER, class_word=DEFAULT_CLASS_WORD),
               CLASS_TEMPLATE.format(class_word=DEFAULT_CLASS_WORD)]
    ids = tokenizer(prompts, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return {"pixel_values": torch.stack(pixels).contiguous().float(), "input_ids": ids}


def load_reference(flags: argparse.Namespace, folder: str, device: Any) -> SimpleNamespace:
    """What train_dreambooth.py sets up before its loop: the models from_pretrained, frozen or trained, on the
    device in their dtypes, and the optimizer (AdamW, or bitsandbytes' 8-bit AdamW, with its defaults)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
    ref = SimpleNamespace(tokenizer=load_tokenizer(TOKENIZER_DIR),
                          noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
                          text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                          vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                          unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    ref.tokenizer.model_max_length = ref.text_encoder.config.max_position_embeddings
    ref.vae.requires_grad_(False)
    ref.text_encoder.requires_grad_(flags.train_text_encoder)
    if flags.gradient_checkpointing:
        ref.unet.enable_gradient_checkpointing()
        if flags.train_text_encoder:
            ref.text_encoder.gradient_checkpointing_enable()
    ref.params = list(ref.unet.parameters()) + (list(ref.text_encoder.parameters()) if flags.train_text_encoder
                                                else [])
    if flags.use_8bit_adam:
        import bitsandbytes as bnb
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    ref.optimizer = optimizer_class(ref.params, lr=flags.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2,
                                    eps=1e-8)
    ref.dtype = getattr(torch, PRECISIONS[flags.mixed_precision] or "float32")
    ref.unet.to(device).train()
    ref.vae.to(device, dtype=ref.dtype)
    ref.text_encoder.to(device, dtype=torch.float32 if flags.train_text_encoder else ref.dtype)
    ref.text_encoder.train(flags.train_text_encoder)
    return ref


def diffusers_worker(spec: dict) -> dict:
    """The training step of diffusers' examples/dreambooth/train_dreambooth.py with prior preservation, as its
    loop runs it under accelerate (one process, no gradient accumulation, the constant learning rate)."""
    import torch
    import torch.nn.functional as F
    flags, device = reference_parser().parse_args(spec["flags"]), torch.device(spec["device"])
    apply_backend_settings(spec["backend"])  # the flags our run trained with
    ref = load_reference(flags, spec["model"], device)
    autocast = torch.autocast(device.type, dtype=ref.dtype, enabled=flags.mixed_precision != "no")  # accelerate's
    scaler = torch.amp.GradScaler(device.type, enabled=flags.mixed_precision == "fp16")
    startup, steps, last = time.time() - spec["start_time"], [], synced_clock(device)
    for step in range(spec["steps"]):
        batch = dreambooth_batch(Path(spec["photos"]), step, spec["size"], ref.tokenizer)
        model_input = ref.vae.encode(batch["pixel_values"].to(device, dtype=ref.dtype)).latent_dist.sample()
        model_input = model_input * ref.vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, ref.noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                  device=device).long()
        noisy_model_input = ref.noise_scheduler.add_noise(model_input, noise, timesteps)
        with autocast:
            encoder_hidden_states = ref.text_encoder(batch["input_ids"].to(device), attention_mask=None)[0]
            model_pred = ref.unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean") + flags.prior_loss_weight * prior_loss
        scaler.scale(loss).backward()
        scaler.unscale_(ref.optimizer)
        torch.nn.utils.clip_grad_norm_(ref.params, flags.max_grad_norm)
        scaler.step(ref.optimizer)
        scaler.update()
        ref.optimizer.zero_grad(set_to_none=flags.set_grads_to_none)
        loss.detach().item()  # the loss their progress bar shows each step
        now = synced_clock(device)
        steps.append(now - last)
        last = now
    return {"steps": steps, "startup_s": startup, **peak_memory(device), "backend": backend_settings(),
            "precision": f"mixed_precision {flags.mixed_precision}", "optimizer": type(ref.optimizer).__name__,
            "gradient_checkpointing": flags.gradient_checkpointing}


def unet_worker(spec: dict, ours: bool) -> dict:
    """Forward and backward of one UNet (random weights, seeded input) `steps` times; the first pass warms up."""
    import torch
    params, device = spec["unet"], torch.device(spec["device"])
    apply_backend_settings(spec["backend"])
    torch.manual_seed(0)
    if ours:
        model = UNetModel(**params)
    else:
        from diffusers import UNet2DConditionModel
        model = UNet2DConditionModel(**diffusers_unet_config(params))
        if params.get("use_checkpoint"):
            model.enable_gradient_checkpointing()
    model.to(device).train()
    x = torch.randn(2, *spec["latent"], device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    context = torch.randn(2, spec["context_length"], params["context_dim"], device=device)
    startup, steps, last = time.time() - spec["start_time"], [], synced_clock(device)
    for _ in range(spec["steps"]):
        out = model(x, t, context) if ours else model(x, t, encoder_hidden_states=context).sample
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)
        now = synced_clock(device)
        steps.append(now - last)
        last = now
    return {"steps": steps, "startup_s": startup, **peak_memory(device), "backend": backend_settings(),
            "precision": "fp32", "latent": spec["latent"],
            "gradient_checkpointing": bool(params.get("use_checkpoint"))}


WORKERS = {"diffusers": diffusers_worker, "unet_ours": lambda spec: unet_worker(spec, ours=True),
           "unet_diffusers": lambda spec: unet_worker(spec, ours=False)}
