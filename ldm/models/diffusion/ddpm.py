"""DDPM and LatentDiffusion (Ho et al. 2020; Rombach et al. 2022) as Stable Diffusion v1 and DreamBooth need them."""
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from ldm.checkpoint import save_weights
from ldm.data.batch import CONCEPT_KEY, MASK_KEY, MOMENTS_KEY, class_key, prefixes, split_batch
from ldm.embeddings.training import EmbeddingTraining
from ldm.lora.layers import LoraOptions, cast_base
from ldm.lora.training import LoraTraining
from ldm.models.diffusion.ema_weights import EmaWeights
from ldm.models.diffusion.frozen_prior import FrozenPrior
from ldm.models.diffusion.text_encoder_stop import TextEncoderStop
from ldm.modules.diffusionmodules.schedule import (SCHEDULE_BUFFERS, extract_into_tensor, make_beta_schedule,
                                                   schedule_buffers)
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import DreamBoothObjective, FrozenModelTarget, NoiseObjective, PriorPreservationLoss, Rollout
from ldm.optim.factory import check_fused_backward, is_schedule_free, make_optimizer, uses_fused_backward
from ldm.optim.schedules import LRSchedule, lr_lambda
from ldm.util import UserError, instantiate_from_config

logger = logging.getLogger(__name__)

FROZEN_PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: half under 16-mixed or bf16-mixed, else as loaded
CAPTION_BATCH = 32  # captions per text-encoder call when every caption is cached before training


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` so that checkpoint keys read `model.diffusion_model.*`."""

    def __init__(self, unet_config: Mapping, conditioning_key: str = "crossattn"):
        super().__init__()
        if conditioning_key != "crossattn":
            raise ValueError(f"conditioning_key {conditioning_key!r} is not supported; SD v1 uses 'crossattn'")
        self.diffusion_model = instantiate_from_config(unet_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                control: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context, control=control)


class DDPM(EmaWeights, pl.LightningModule):
    """The noise schedule, the denoiser, the forward process q(x_t | x_0) and the eps-prediction loss."""

    def __init__(self, unet_config: Mapping, timesteps: int = 1000, beta_schedule: str = "linear",
                 linear_start: float = 1e-4, linear_end: float = 2e-2, image_size: int = 64, channels: int = 4,
                 first_stage_key: str = "image", conditioning_key: str = "crossattn", parameterization: str = "eps",
                 use_ema: bool = False, reg_weight: float = 1.0, log_every_t: int = 100,
                 monitor: str | None = None, num_timesteps_cond: int = 1, offset_noise: float = 0.0,
                 input_perturbation: float = 0.0, timestep_range: Optional[Sequence[int]] = None,
                 loss_weighting: str = "none", snr_gamma: float = 5.0, p2_k: float = 1.0, p2_gamma: float = 1.0,
                 loss_type: str = "l2", huber_c: float = 0.1, huber_schedule: str = "constant",
                 ema_decay: float = 0.9999, ema_warmup: bool = True, ema_device: str = "model",
                 scheduled_sampling_probability: float = 0.0, scheduled_sampling_max_step_offset: int = 0,
                 scheduled_sampling_ramp_steps: int = 0, scheduled_sampling_sampler: str = "ddim",
                 prior_preservation: str = "class_images"):
        super().__init__()
        if parameterization != "eps":
            raise ValueError(f"parameterization {parameterization!r} is not supported; SD v1 predicts 'eps'")
        if num_timesteps_cond != 1:  # kept for CompVis configs, which always set 1
            raise ValueError("num_timesteps_cond must be 1 (timestep-dependent conditioning is not part of SD v1)")
        self.parameterization = parameterization
        self.image_size = image_size
        self.channels = channels
        self.first_stage_key = first_stage_key
        self.log_every_t = log_every_t
        self.monitor = monitor
        self.learning_rate: float | None = None  # set by main.py from base_learning_rate
        self.unet_params = dict(unet_config.get("params") or {})
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = False
        if ema_device not in ("cpu", "model"):
            raise UserError(f"model.params.ema_device {ema_device!r}: model (its device) or cpu (no GPU memory)")
        self.ema_options = {"decay": ema_decay, "use_num_updates": ema_warmup,
                            "device": "cpu" if ema_device == "cpu" else None}
        if use_ema:
            self.init_ema(self.model)
        self.num_timesteps = int(timesteps)
        self.objective = DreamBoothObjective(
            NoiseObjective(offset_noise, input_perturbation, timestep_range, loss_weighting, snr_gamma, p2_k, p2_gamma,
                           loss_type, huber_c, huber_schedule),
            Rollout(scheduled_sampling_probability, scheduled_sampling_max_step_offset, scheduled_sampling_ramp_steps,
                    scheduled_sampling_sampler),
            PriorPreservationLoss(reg_weight, prior_preservation))
        self.objective.check(self.num_timesteps)
        betas = make_beta_schedule(beta_schedule, self.num_timesteps, linear_start, linear_end)
        for name, value in schedule_buffers(betas).items():
            self.register_buffer(name, value)

    @property
    def reg_weight(self) -> float:
        return self.objective.prior.reg_weight

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) (Ho et al. 2020, eq. 4)."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), written with the stored reciprocal buffers."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    control: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """The denoiser's eps prediction for x_t at timesteps t under text conditioning `cond` (and a ControlNet's
        residuals `control`), in float32 (inputs go in at the UNet's own dtype, so that a UNet held in bf16 takes
        float32 latents)."""
        dtype = self.unet_dtype
        if control is not None:
            control = [residual.to(dtype) for residual in control]
        return self.model(x_noisy.to(dtype), t, context=cond.to(dtype), control=control).float()

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the UNet holds its weights in (float32 unless trained with --precision bf16-true, or a LoRA
        run's half-precision base)."""
        return self.model.diffusion_model.out[-1].weight.dtype

    def setup(self, stage: str) -> None:
        """Before Lightning casts the model for a `*-true` precision, keep the noise schedule's float32 values."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision.endswith("-true") and not precision.startswith(("32", "64")):
            self._schedule_fp32 = {name: buffer.detach().clone() for name, buffer in self.named_buffers()
                                   if name in SCHEDULE_BUFFERS}

    def on_fit_start(self) -> None:
        """Put the float32 noise schedule back after a half-precision cast of the whole model."""
        for name, value in getattr(self, "_schedule_fp32", {}).items():
            setattr(self, name, value.to(getattr(self, name).device))

    def p_losses(self, x_start: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 frozen: FrozenModelTarget | None = None) -> torch.Tensor:
        """Per-sample loss of the DreamBooth objective (ldm/modules/losses/dreambooth.py), with a loss mask `weight`
        [B, 1, h, w] when given and the frozen model's `frozen` class targets; in training, with scheduled sampling
        at this step."""
        return self.objective.per_sample(self.apply_model, self.q_sample, self.alphas_cumprod, x_start, cond, t, noise,
                                         weight, self.global_step if self.training else None, frozen)

    weights_suffix = ".ckpt"  # of a step file

    def save_step_weights(self, path: Path, dtype: Optional[torch.dtype] = None,
                          shared_dtype: Optional[torch.dtype] = None, beside_resumable: bool = False) -> None:
        """Write the weights only (no optimizer state) as an SD v1 `path` (.ckpt) in `dtype`, and with `shared_dtype`
        a .safetensors copy beside it; `beside_resumable`: `path` is the resumable last.ckpt the trainer wrote, so
        only the copy."""
        state = self.step_state_dict()
        if not beside_resumable:
            save_weights(state, path, dtype=dtype)
        if shared_dtype is not None:
            save_weights(state, path.with_suffix(".safetensors"), dtype=shared_dtype)

    def step_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an SD v1 step file holds."""
        return self.state_dict()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """On a CPU the gradients are zeroed in place: freeing them lets the next backward fault in new pages for the
        whole model (about 5 s of a 20 s full-size step on the 2-core CPU). A GPU's caching allocator has no such
        cost, so there they are freed, which lowers the peak of the next forward."""
        optimizer.zero_grad(set_to_none=self.device.type != "cpu")


class LatentDiffusion(EmbeddingTraining, TextEncoderStop, LoraTraining, FrozenPrior, DDPM):
    """Diffusion in the VAE's latent space, conditioned on CLIP text embeddings through cross-attention; with
    `lora`, a LoRA run (ldm/lora/training.py); with `embedding`, textual inversion (ldm/embeddings/training.py); with
    prior_preservation frozen_model, the class term from the frozen base model (frozen_prior.py)."""

    def __init__(self, first_stage_config: Mapping, cond_stage_config: Mapping, cond_stage_key: str = "caption",
                 cond_stage_trainable: bool = False, scale_factor: float = 1.0, cond_stage_lr: Optional[float] = None,
                 cond_stage_stop_step: Optional[float] = None, lr_schedule: Optional[Mapping] = None,
                 scheduler_config: Optional[Mapping] = None, optimizer: Optional[Mapping] = None,
                 frozen_precision: str = "auto", compile_unet: Union[bool, Mapping] = False,
                 cache_text_embeddings: bool = False, lora: Optional[Mapping] = None,
                 embedding: Optional[Mapping] = None, prior_base_checkpoint: Optional[str] = None,
                 prior_base_ema: bool = False, **kwargs: Any):
        use_ema = kwargs.pop("use_ema", False)
        inversion = bool(embedding) and not lora and not embedding.get("pivotal")  # textual inversion: UNet frozen
        # a LoRA's EMA starts once injected (inject_lora), a textual inversion's once its vectors are made
        super().__init__(use_ema=use_ema and not lora and not inversion, **kwargs)
        self.adapter_ema = bool(use_ema and lora)
        self.embedding_ema = bool(use_ema and embedding)  # the vectors join the average (add_embedding)
        self.prior_base_checkpoint, self.prior_base_ema = prior_base_checkpoint, prior_base_ema
        self.lora = LoraOptions.from_config(lora)
        if self.lora is not None:
            if cond_stage_trainable and not self.lora.text_encoder:
                raise UserError("LoRA keeps the base model frozen, but cond_stage_trainable is true: set it false, "
                                "or train the text encoder's LoRA with lora.text_encoder (--lora_text_encoder)")
            cond_stage_trainable = self.lora.text_encoder  # the text encoder's LoRA trains
        self.init_embedding(embedding, cond_stage_trainable)
        if frozen_precision not in FROZEN_PRECISIONS:
            raise UserError(f"model.params.frozen_precision {frozen_precision!r}: expected one of "
                            f"{', '.join(FROZEN_PRECISIONS)}")
        self.frozen_precision = frozen_precision
        self.compile_unet = compile_unet
        for key, flag, value in (("cond_stage_lr", "--text_encoder_lr", cond_stage_lr),
                                 ("cond_stage_stop_step", "--stop_text_encoder_training", cond_stage_stop_step)):
            if value is not None and not cond_stage_trainable:
                raise UserError(f"{key} {value} ({flag}) is set but the text encoder is frozen "
                                "(cond_stage_trainable false, or --freeze_text_encoder): drop one of them")
        if cond_stage_stop_step is not None and cond_stage_stop_step <= 0:
            raise UserError(f"--stop_text_encoder_training {cond_stage_stop_step}: expected a step, or a fraction of "
                            "max_steps below 1, above 0 (to train the UNet only, use --freeze_text_encoder)")
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_lr = cond_stage_lr  # main.py scales it as it scales base_learning_rate
        self.cond_stage_stop_step = cond_stage_stop_step
        self.text_encoder_stopped_at: Optional[int] = None  # from last.ckpt: a resume never trains it again
        if lr_schedule and scheduler_config:
            raise UserError("model.params.lr_schedule (--lr_scheduler) and model.params.scheduler_config are both "
                            "set: keep one")
        self.lr_schedule = self._lr_schedule(lr_schedule)
        self.compvis_schedule = instantiate_from_config(scheduler_config).schedule if scheduler_config else None
        self.optimizer_config = optimizer
        self.scale_factor = scale_factor
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.first_stage_model.requires_grad_(False)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.cond_stage_model.requires_grad_(cond_stage_trainable)
        self.cache_text_embeddings = cache_text_embeddings
        self.text_embeddings: dict[str, torch.Tensor] = {}
        self.latents_cached = False  # set by ldm.training.latent_cache once the batches carry cached VAE moments
        self.offloaded: list[nn.Module] = []
        if cache_text_embeddings and cond_stage_trainable:
            logger.info("cache_text_embeddings: no effect while the text encoder trains (its embeddings change every "
                        "step); it applies once the text encoder is frozen")
        self.train(False)

    @staticmethod
    def _lr_schedule(options: Optional[Mapping]) -> Optional[LRSchedule]:
        if not options:
            return None
        try:
            schedule = LRSchedule(**options)
        except TypeError as err:
            raise UserError(f"model.params.lr_schedule: {err}") from None
        schedule.check()
        return None if schedule.name == "constant" else schedule  # the constant rate needs no scheduler

    def setup(self, stage: str) -> None:
        """Store the frozen parts (the VAE, the text encoder when it does not train, a LoRA run's base on an
        accelerator) in half precision under a mixed-precision run, or as `frozen_precision` says; they compute
        under autocast as before."""
        super().setup(stage)
        if self.compile_unet:
            self.compile_diffusion_model()
        trainer = self._trainer
        precision = str(trainer.precision) if trainer is not None else "32-true"
        device = trainer.strategy.root_device if trainer is not None else self.device
        self.place_frozen_copy(device, precision)
        dtype = self.frozen_dtype(precision)
        if dtype is None:
            return
        frozen = [self.first_stage_model] + ([] if self.cond_stage_trainable else [self.cond_stage_model])
        frozen += self.frozen_base(device.type)
        for part in frozen:
            cast_base(part, dtype)
        logger.info("frozen parts (%s) stored in %s", ", ".join(type(p).__name__ for p in frozen),
                    str(dtype).removeprefix("torch."))

    def compile_diffusion_model(self) -> None:
        """`torch.compile` the UNet in place (its state-dict keys stay as they are); `compile_unet` is true or a
        mapping of torch.compile options, e.g. {mode: max-autotune}."""
        options = dict(self.compile_unet) if isinstance(self.compile_unet, Mapping) else {}
        try:
            self.model.diffusion_model.compile(**options)
        except TypeError as err:
            raise UserError(f"model.params.compile_unet {options}: {err}") from None
        logger.info("the UNet is compiled with torch.compile%s; the first steps are slow while it compiles",
                    f" ({options})" if options else "")

    def frozen_dtype(self, precision: str) -> Optional[torch.dtype]:
        """The dtype for the frozen parts under a trainer precision, or None to leave them as they are."""
        if self.frozen_precision == "auto":
            return {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.frozen_precision]

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Switch modes, keeping the frozen VAE (and a frozen text encoder) in eval mode."""
        super().train(mode)
        self.first_stage_model.train(False)
        if not self.cond_stage_trainable:
            self.cond_stage_model.train(False)
        return self

    def get_learned_conditioning(self, captions: list[str]) -> torch.Tensor:
        """CLIP text embeddings [B, 77, context_dim] for a list of prompts; with `cache_text_embeddings` and a frozen
        text encoder each distinct prompt is encoded once and kept in memory."""
        if not self.cache_text_embeddings or self.text_conditioning_trains:
            return self.encode_text(list(captions)).float()
        new = list(dict.fromkeys(caption for caption in captions if caption not in self.text_embeddings))
        if new:
            with torch.no_grad():
                self.text_embeddings.update(zip(new, self.encode_text(new).float().to(self.device)))
        return torch.stack([self.text_embeddings[caption] for caption in captions]).to(self.device)

    def encode_first_stage(self, x: torch.Tensor):
        """VAE posterior of images in [-1, 1], shape [B, 3, H, W]."""
        return self.first_stage_model.encode(x.to(self.first_stage_model.encoder.conv_in.weight.dtype))

    def get_first_stage_encoding(self, posterior) -> torch.Tensor:
        """A latent sample of the posterior, scaled to unit variance by `scale_factor`."""
        return self.scale_factor * posterior.sample().float()

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from scaled latents."""
        dtype = self.first_stage_model.decoder.conv_out.weight.dtype
        return self.first_stage_model.decode((z / self.scale_factor).to(dtype)).float()

    def get_input(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, list[str], int]:
        """Latents and captions of the instance examples, followed by the class examples when the batch has them.

        Images come as [B, H, W, C] in [-1, 1] (the CompVis layout), or as the cached moments of their VAE posterior
        (`moments`, from ldm/training/latent_cache.py), which the latents are drawn from alike; class examples come
        under `class_<key>` (ldm/data/batch.py).
        """
        parts = prefixes(batch, self.cond_stage_key)
        captions = [caption for prefix in parts for caption in batch[f"{prefix}{self.cond_stage_key}"]]
        n_instance = len(batch[self.cond_stage_key])
        with torch.no_grad():
            if MOMENTS_KEY in batch:
                posterior = DiagonalGaussianDistribution(torch.cat([batch[f"{p}{MOMENTS_KEY}"] for p in parts]))
            else:
                images = torch.cat([batch[f"{p}{self.first_stage_key}"] for p in parts])
                x = rearrange(images, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()
                posterior = self.encode_first_stage(x)
            z = self.get_first_stage_encoding(posterior)
        return z, captions, n_instance

    @torch.no_grad()
    def input_images(self, batch: Mapping[str, Any], prefix: str = "") -> torch.Tensor:
        """A batch's images [B, 3, H, W] in [-1, 1], for showing: its pixels, or its cached moments' means decoded."""
        if f"{prefix}{self.first_stage_key}" in batch:
            return batch[f"{prefix}{self.first_stage_key}"].permute(0, 3, 1, 2)
        mean = batch[f"{prefix}{MOMENTS_KEY}"].chunk(2, dim=1)[0]
        return self.decode_first_stage(self.scale_factor * mean.float().to(self.device))

    def shared_step(self, batch: Mapping[str, Any], t: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Instance and class examples in one batched forward, each with its own noise and timestep; in two forwards
        when bucketing gave them different sizes."""
        if self.sizes_differ(batch):
            if t is not None or noise is not None:
                raise ValueError("fixed t and noise need instance and class examples of one size")
            instance, prior = split_batch(batch)
            per_sample = torch.cat([self.per_sample_losses(part)[0] for part in (instance, prior)])
            n_instance = len(instance[self.cond_stage_key])
        else:
            per_sample, n_instance = self.per_sample_losses(batch, t, noise)
        return self.objective.losses(per_sample, n_instance, batch.get(CONCEPT_KEY))

    def per_sample_losses(self, batch: Mapping[str, Any], t: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The loss of every example of `batch` (instance, then class ones), and how many are instance examples."""
        z, captions, n_instance = self.get_input(batch)
        z, captions, masks, frozen = self.frozen_prior_inputs(batch, z, captions, self.loss_masks(batch, z))
        cond = self.get_learned_conditioning(captions)
        if t is None:
            t = self.objective.noise.sample_timesteps(z.shape[0], self.num_timesteps, z.device)
        return self.p_losses(z, cond, t, noise, masks, frozen), n_instance

    def sizes_differ(self, batch: Mapping[str, Any]) -> bool:
        """Whether the batch's instance and class examples have different sizes (aspect buckets)."""
        key = MOMENTS_KEY if MOMENTS_KEY in batch else self.first_stage_key
        return class_key(key) in batch and batch[key].shape[1:] != batch[class_key(key)].shape[1:]

    def loss_masks(self, batch: Mapping[str, Any], z: torch.Tensor) -> torch.Tensor | None:
        """The photos' loss masks at the latent size (area averages), instance then class examples as in `z`; an
        example without one weighs everywhere 1; None when the batch has no mask."""
        if not any(f"{p}{MASK_KEY}" in batch for p in prefixes(batch, self.cond_stage_key)):
            return None
        parts = []
        for p in prefixes(batch, self.cond_stage_key):
            n = len(batch[f"{p}{self.cond_stage_key}"])
            mask = batch.get(f"{p}{MASK_KEY}")
            parts.append(torch.ones(n, 1, *z.shape[-2:], device=z.device) if mask is None else F.interpolate(
                mask[:, None].float().to(z.device), size=z.shape[-2:], mode="area"))
        return torch.cat(parts)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.shared_step(batch)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"loss is {losses['loss'].item()} at step {self.global_step}; stopping. The last good checkpoint "
                "is kept; try a lower learning rate or full precision.")
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=False)
        self.log("loss", losses["loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)
        for index, group in enumerate(self.optimizers().param_groups):  # a resumed group may have lost its name
            name = "" if index == 0 else f"_{group.get('name', 'text_encoder')}"
            self.log(f"train/lr{name}", group["lr"], on_step=True, on_epoch=False)
        return losses["loss"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet's parameters (unless textual inversion freezes it), plus the text encoder's when
        `cond_stage_trainable` (their LoRA weights in a LoRA run), plus the embedding vectors."""
        params = self.trained_parameters(self.model) if self.unet_trains else []
        if self.cond_stage_trainable:
            params += self.trained_parameters(self.cond_stage_model)
        return params + [p for group in self.embedding_groups() for p in group["params"]]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.text_embeddings.clear()  # Lightning may have restored other text encoder weights since they were made

    def on_train_start(self) -> None:
        for optimizer in self.trainer.optimizers:  # a resumed schedule-free optimizer comes back in eval mode
            if is_schedule_free(optimizer):
                optimizer.train()
        if self.cache_text_embeddings and not self.text_conditioning_trains:
            self.encode_every_caption()
        if self.device.type != "cpu" and self.trainer.world_size == 1:  # DDP would broadcast the CPU buffers
            self.offloaded = self.idle_encoders()
            for part in self.offloaded:
                part.to("cpu")
            if self.offloaded:
                logger.info("%s on the CPU while training (their outputs are cached)",
                            "the VAE encoder and the text encoder wait" if self.cond_stage_model in self.offloaded
                            else "the VAE encoder waits")

    def encode_every_caption(self) -> None:
        """Cache the embeddings of every caption of the data and of the empty caption (caption dropout) while the
        text encoder is on the model's device, so that no step runs it once it waits on the CPU."""
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = datamodule.datasets().values() if datamodule is not None else ()
        prior = datamodule.prior_prompts() if getattr(datamodule, "prior_captions", False) else []
        captions = list(dict.fromkeys(["", *prior, *(caption for dataset in datasets for caption in dataset.captions)]))
        for first in range(0, len(captions), CAPTION_BATCH):
            self.get_learned_conditioning(captions[first:first + CAPTION_BATCH])

    def on_train_end(self) -> None:
        super().on_train_end()
        for part in self.offloaded:
            part.to(self.device)
        self.offloaded = []

    def idle_encoders(self) -> list[nn.Module]:
        """What a training step does not run: the VAE encoder with cached latents, and a frozen text encoder whose
        embeddings are cached."""
        if not self.latents_cached:
            return []
        text = [self.cond_stage_model] if self.cache_text_embeddings and not self.text_conditioning_trains else []
        return [self.first_stage_model.encoder, self.first_stage_model.quant_conv] + text

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """The encoders that wait on the CPU while training, on the model's device for the block (image logging)."""
        for part in self.offloaded:
            part.to(self.device)
        try:
            yield
        finally:
            for part in self.offloaded:
                part.to("cpu")

    def configure_optimizers(self) -> Any:
        if self.learning_rate is None:
            raise ValueError("learning_rate is not set; main.py sets it from model.base_learning_rate")
        unet = self.trained_parameters(self.model) if self.unet_trains else []
        if self.cond_stage_lr is None:
            text = self.trained_parameters(self.cond_stage_model) if self.cond_stage_trainable else []
            groups = [{"params": unet + text}]
        else:
            groups = [{"params": unet}, {"params": self.trained_parameters(self.cond_stage_model),
                                         "lr": self.cond_stage_lr, "name": "text_encoder"}]
        params = [group for group in groups + self.embedding_groups() if group["params"]]
        optimizer = make_optimizer(self.optimizer_config, params, self.learning_rate)
        if uses_fused_backward(optimizer):
            check_fused_backward(self.trainer, bool(self.compile_unet))
        if self.lr_schedule is None and self.compvis_schedule is None:
            return optimizer
        if is_schedule_free(optimizer):
            logger.warning("a learning-rate schedule with a schedule-free optimizer: it is meant to run without one")
        factor = lr_lambda(self.lr_schedule, self.compvis_schedule, self.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
