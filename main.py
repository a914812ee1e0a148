"""DreamBooth fine-tuning of Stable Diffusion v1 (Ruiz et al. 2023) with the CompVis / XavierXiao command line:

    python main.py --base configs/stable-diffusion/v1-finetune_unfrozen.yaml -t --actual_resume sd-v1-4-full-ema.ckpt
        -n <job> --gpus 0, --data_root <photos> --reg_data_root <class images> --class_word dog

Configs given with --base are merged left to right, then `a.b=c` arguments override single keys.
"""
import argparse
import contextlib
import datetime
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.strategies import DDPStrategy, Strategy
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.callbacks import (AtomicCheckpointIO, BestStep, RankSeed, SetupCallback, StartAtStep, StepCheckpoint,
                           StepProgress, quiet_lightning)
from ldm.checkpoint import check_checkpoint_file, load_model_weights, parameters_on_meta
from ldm.cli import run_command
from ldm.config import check_config, load_run_config
from ldm.inference.precision import check_training_precision
from ldm.training.class_images import generate_class_images, generation_dtype
from ldm.training.flags import apply_flags, fix_step_fractions, parse_devices, parse_gpus, str2bool
from ldm.training.latent_cache import cache_latents
from ldm.training.runs import (Run, launched_per_process, new_run, resumed_run, run_lock, takes_run_lock,
                               warn_fresh_optimizer)
from ldm.util import (FLOAT32_MATMUL_PRECISION, DiskFullError, UserError, ensure_writable_dir, instantiate_from_config,
                      user_or_project_path)

RUN_DIR_ENV = "DREAMBOOTH_RUN_DIR"  # tells the DDP worker processes, which re-run this script, the run folder
say = rank_zero_only(print)



def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add = parser.add_argument
    flag = {"type": str2bool, "nargs": "?", "const": True, "default": False}
    add("-n", "--name", default="", help="job name, the suffix of the run folder logs/<timestamp>_<name>")
    add("-r", "--resume", default="",
        help="resume a run folder (from its checkpoints/last.ckpt), a checkpoint in it, or 'latest': the run under "
             "--logdir whose last.ckpt was written last (not the newest-created folder, unless none has one)")
    add("--resume_weights_only", action="store_true",
        help="with -r: continue from the newest weights-only step_N.ckpt at step N with a fresh optimizer")
    add("-b", "--base", nargs="*", type=user_or_project_path, default=[], metavar="config.yaml",
        help="configs, merged left to right (configs/... not in the working folder: the project's own)")
    add("-t", "--train", **flag, help="train (required unless resuming: there is nothing else to do)")
    add("--no-test", **flag, help="accepted for compatibility; DreamBooth has no test stage")
    add("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    add("-f", "--postfix", default="", help="appended to the run folder name")
    add("-l", "--logdir", default="logs", help="where run folders are created")
    add("--scale_lr", **flag, help="scale base_learning_rate by devices x batch size x gradient accumulation")
    add("--actual_resume", type=user_or_project_path, default=None,
        help="the Stable Diffusion v1 checkpoint to fine-tune (.ckpt/.safetensors)")
    add("--use_ema_weights", action="store_true", help="start from the file's EMA UNet weights (default: non-EMA)")
    add("--data_root", action="append", help="folder of photos of the subject (instance images); repeat it, with "
        "--token, to train several subjects at once (data.params.concepts)")
    add("--reg_data_root", action="append", help="folder of class images (prior preservation); once per subject "
        "or once for all")
    add("--class_word", action="append", help="the subject's class, e.g. dog (default: dog); once per subject or "
        "once for all")
    add("--token", "--identifier", dest="identifier", action="append",
        help="rare token naming the subject in captions (default: sks); once per subject")
    add("--num_class_images", type=int, default=None,
        help="generate class images with the base model until --reg_data_root holds this many (0: off)")
    add("--class_prompt", default=None, help="the prompt of generated class images and the class captions "
        "(default 'a photo of a {class_word}' to generate; data.params.class_prompt)")
    add("--class_negative_prompt", default=None, help="what generated class images steer away from")
    add("--class_sampler", default=None, help="the sampler of generated class images (default ddim; any of "
        "stable_txt2img.py's)")
    add("--prior", choices=("class_images", "frozen_model"), default=None,
        help="prior preservation from class images (default) or from the frozen base model's own predictions on the "
             "class prompt, which needs no class images (model.params.prior_preservation)")
    add("--max_steps", type=int, default=None, help="training steps (overrides lightning.trainer.max_steps)")
    add("--gpus", default=None,
        help="CUDA GPUs as in Lightning 1.x: '0,' is GPU 0, '0,1' GPUs 0 and 1 (DDP), '2' any two")
    add("--accelerator", default=None, help="cpu, gpu, mps or auto (default: auto)")
    add("--devices", default=None, help="number of devices, or indices such as 0,1")
    add("--precision", default=None, help="32-true (default), 16-mixed, bf16-mixed, ...")
    add("--strategy", default=None, help="Lightning's strategy: ddp (the default with several devices), ddp_spawn, "
        "fsdp, deepspeed_stage_2, ... (lightning.trainer.strategy)")
    add("--num_nodes", type=int, default=None, help="machines taking part (lightning.trainer.num_nodes); launch one "
        "process per node with torchrun or SLURM as Lightning expects (see docs/distributed.md)")
    add("--lr_scheduler", default=None, help="learning-rate schedule: constant (default), constant_with_warmup, "
        "linear, cosine, cosine_with_restarts, polynomial (model.params.lr_schedule.name)")
    add("--lr_warmup_steps", type=float, default=None,
        help="linear warmup steps of the schedule, or a fraction of max_steps below 1")
    add("--stop_text_encoder_training", type=float, default=None, metavar="N",
        help="freeze the text encoder from step N (a fraction of max_steps below 1, made a step when the run starts, "
             "so a resume keeps it; model.params.cond_stage_stop_step)")
    add("--freeze_text_encoder", action="store_true", help="train the UNet only (less memory)")
    add("--cache_latents", action="store_true", help="encode the training images once with the VAE, and each caption "
        "once with a frozen text encoder, so that a step runs the UNet only (data.params.cache_latents, "
        "model.params.cache_text_embeddings; the cache is kept in <run>/cache)")
    add("--clip_skip", type=int, default=None, metavar="N",
        help="condition on the N-th text encoder layer from the end, as A1111 and kohya: 1 the last (default), "
             "2 the penultimate (model.params.cond_stage_config.params.clip_skip; sampling from the run uses it)")
    add("--text_encoder_lr", type=float, default=None,
        help="the text encoder's base learning rate (model.params.cond_stage_lr; default: base_learning_rate)")
    add("--gradient_checkpointing", action="store_true", help="recompute activations in backward, for the UNet and "
        "a training text encoder: less memory, slower steps (unet_config.params.use_checkpoint, "
        "cond_stage_config.params.gradient_checkpointing)")
    add("--optimizer", default=None, metavar="NAME", help="adamw (default), adamw8bit_torch, adamw8bit, adafactor, "
        "prodigy, lion, schedulefree_adamw or a dotted class path (model.params.optimizer.target)")
    add("--fused_backward", action="store_true", help="step the optimizer inside the backward pass, one parameter "
        "at a time, so that the full set of gradients is never held (model.params.optimizer.fused_backward)")
    add("--compile", action="store_true", help="torch.compile the UNet (model.params.compile_unet)")
    add("--rank", type=int, default=None, metavar="N", help="train LoRA of rank N (4, 8 and 16 are usual) instead "
        "of the whole model; the base stays frozen (model.params.lora.rank; configs/*/v1-finetune_lora.yaml)")
    add("--lora_alpha", type=float, default=None, help="LoRA alpha: the update is scaled by alpha / rank "
        "(default: the rank; model.params.lora.alpha)")
    add("--network", default=None, metavar="lora|dora|loha|lokr", help="the kind of low-rank network: lora "
        "(default), dora (LoRA with a trained magnitude per output row), loha (Hadamard product of two LoRAs) or lokr "
        "(Kronecker product); LyCORIS's file format for the last three (model.params.lora.network)")
    add("--factor", type=int, default=None, metavar="F", help="LoKr only: split each weight's sides into factors "
        "near F (default -1: as balanced as possible, LyCORIS's default; model.params.lora.factor)")
    add("--lora_targets", choices=("transformer", "attention"), default=None,
        help="transformer (default, kohya's): every Linear and 1x1 conv of the UNet's transformer blocks; attention "
             "(diffusers'): the attention q, k, v and out projections (model.params.lora.targets)")
    add("--lora_text_encoder", action="store_true",
        help="also train LoRA on the text encoder's attention and MLP (model.params.lora.text_encoder)")
    add("--train_embedding", action="store_true", help="textual inversion: learn new token vectors for --token, the "
        "UNet and text encoder frozen; with --rank or --pivotal, beside the LoRA or the UNet (pivotal tuning; "
        "model.params.embedding; docs/embeddings.md)")
    add("--num_vectors", type=int, default=None, metavar="N", help="vectors the token stands for (default 1)")
    add("--init_word", default=None, help="the word whose token embeddings start the vectors (default: --class_word)")
    add("--embedding_lr", type=float, default=None, help="the vectors' base learning rate (default 5e-3)")
    add("--embedding_stop_step", type=float, default=None, metavar="N", help="pivotal tuning: freeze the vectors "
        "from step N (a fraction of max_steps below 1), the UNet or LoRA trains on")
    add("--pivotal", action="store_true", help="with --train_embedding: the whole UNet trains beside the vectors")
    add("--safetensors", action="store_true", help="also save fp16 .safetensors weights next to each checkpoint")
    add("--threads", type=int, default=None, metavar="N", help="CPU threads per process (torch.set_num_threads and "
        "OMP_NUM_THREADS; default: torch's, one per core). On a busy machine fewer threads can be much faster; the "
        "start line says how many")
    add("--save_precision", default=None, metavar="fp16|bf16|fp32",
        help="precision of the weights-only step_N.ckpt files and the .safetensors copies (default: step files as "
             "trained, copies fp16); last.ckpt keeps full precision (lightning.modelcheckpoint.params.save_precision)")
    return parser


def set_threads(threads: Optional[int]) -> None:
    """--threads: torch's CPU threads in this process, and OMP_NUM_THREADS for the processes it starts (DDP workers
    re-run this script with the flag)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads {threads}: expected 1 or more CPU threads")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_folder(opt: argparse.Namespace, now: str) -> Run:
    """The run folder, what it resumes from (if anything) and the config files to merge."""
    if opt.resume_weights_only and not opt.resume:
        raise UserError("--resume_weights_only goes with -r/--resume <run folder>")
    if opt.resume:
        run = resumed_run(opt.resume, opt.logdir, opt.resume_weights_only)
        ensure_writable_dir(run.logdir, "-r")
        run.configs += opt.base
        return run
    if os.environ.get(RUN_DIR_ENV):
        return Run(Path(os.environ[RUN_DIR_ENV]), configs=opt.base)
    if launched_per_process():
        raise UserError(f"every process of this run was started by torchrun, SLURM or mpirun, so each would make a "
                        f"run folder of its own: export {RUN_DIR_ENV}=logs/<name> for all of them (or resume one "
                        "with -r)")
    ensure_writable_dir(opt.logdir, "--logdir")
    run = new_run(opt.logdir, opt.name or (Path(opt.base[0]).stem if opt.base else ""), opt.postfix, now)
    run.configs = opt.base
    return run


def trainer_options(trainer_config: DictConfig, opt: argparse.Namespace) -> dict[str, Any]:
    """Trainer arguments from `lightning.trainer` and the device flags, with Lightning 1.x `gpus` translated."""
    options = OmegaConf.to_container(trainer_config, resolve=True)
    if any(flag is not None for flag in (opt.gpus, opt.accelerator, opt.devices)):
        for key in ("gpus", "accelerator", "devices"):  # the flags replace the config's choice
            options.pop(key, None)
    gpus = opt.gpus if opt.gpus is not None else options.pop("gpus", None)
    for key, value in (("accelerator", opt.accelerator), ("devices", opt.devices), ("precision", opt.precision),
                       ("strategy", opt.strategy), ("num_nodes", opt.num_nodes)):
        if value is not None:
            options[key] = parse_devices(value) if key == "devices" else value
    if gpus is not None:
        if options.get("accelerator", "gpu") not in ("gpu", "cuda") or opt.devices is not None:
            raise UserError("--gpus already chooses the devices: drop --accelerator/--devices (or --gpus)")
        options["accelerator"], options["devices"] = "gpu", parse_gpus(str(gpus))
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {gpus}: PyTorch {torch.__version__} sees no CUDA GPU here; train on the CPU "
                            "with --accelerator cpu, or install a CUDA build of PyTorch")
    known = set(inspect.signature(pl.Trainer.__init__).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"lightning.trainer has keys that Lightning {pl.__version__} does not know: {unknown} "
                        "(to resume use -r; for devices use --gpus/--accelerator/--devices)")
    max_steps = options.get("max_steps")
    if not isinstance(max_steps, int) or max_steps < 1:
        where = (f"--max_steps {opt.max_steps}" if opt.max_steps is not None
                 else f"lightning.trainer.max_steps {max_steps}")
        raise UserError(f"{where}: the number of training steps must be at least 1")
    options.setdefault("enable_progress_bar", False)  # ldm.callbacks.StepProgress shows steps, not epochs
    options.setdefault("enable_model_summary", False)  # its start line counts the parameters
    return options


def make_loggers(logdir: Path, now: str) -> list[Logger]:
    """CSV metrics in the run folder (one file per session, so a resumed run keeps the earlier ones), and
    TensorBoard too when it is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(logdir), name="csv", version=now)]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(save_dir=str(logdir), name="tensorboard", version=now))
    except ModuleNotFoundError:
        pass
    return loggers


@contextlib.contextmanager
def config_errors(where: str) -> Iterator[None]:
    """Report a config that names a wrong key or class, or a value its constructor refuses, as a user error (other
    errors keep their traceback)."""
    try:
        yield
    except (KeyError, ImportError) as err:
        raise UserError(f"config {where}: {err}") from None
    except AttributeError as err:
        if str(err).startswith("module "):  # a target naming a class its module does not have
            raise UserError(f"config {where}: {err}") from None
        raise
    except TypeError as err:
        if "unexpected keyword argument" in str(err) or "required positional argument" in str(err):
            raise UserError(f"config {where}: {err}") from None
        raise
    except ValueError as err:  # a constructor refusing a value of the config
        raise UserError(f"config {where}: {err}") from None


def build(config: DictConfig, where: str, **extra: Any) -> Any:
    """`instantiate_from_config` with config mistakes reported as user errors."""
    check_config(config, where)
    with config_errors(where):
        return instantiate_from_config(config, **extra)


def make_callbacks(lightning: DictConfig, run: Run, now: str, config: DictConfig, seed: int) -> list[pl.Callback]:
    """Our callbacks in the order their hooks run: the seeds first (so that an optimizer step's shared stream ends
    before any other callback draws), then the start step, the configured ones with the best step after the
    monitors, progress and its summary last."""
    checkpoint_config = OmegaConf.merge(
        {"target": "ldm.callbacks.StepCheckpoint", "params": {"dirpath": str(run.logdir / "checkpoints")}},
        lightning.get("modelcheckpoint") or {})
    callbacks = [RankSeed(seed)] + ([StartAtStep(run.step)] if run.weights else [])
    callbacks += [SetupCallback(str(run.logdir), now, config, lightning),
                  build(checkpoint_config, "lightning.modelcheckpoint")]
    configured = [build(callback_config, f"lightning.callbacks.{name}")
                  for name, callback_config in (lightning.get("callbacks") or {}).items()]
    callbacks += sorted(configured, key=lambda c: isinstance(c, BestStep))  # after the monitors it watches
    if lightning.get("loss_plot", True) is not False:  # on by default; `lightning.loss_plot: false` turns it off
        callbacks.append(build(OmegaConf.merge({"target": "ldm.callbacks.LossPlot"}, lightning.get("loss_plot") or {}),
                               "lightning.loss_plot"))
    progress_config = OmegaConf.merge({"target": "ldm.callbacks.StepProgress"}, lightning.get("progress") or {})
    return callbacks + [build(progress_config, "lightning.progress")]


def prepare_data(config: DictConfig, resuming: bool):
    """Build the data module and check every image now, before any model is loaded."""
    data = build(config.data, "data")
    with config_errors("data.params.train/reg"):
        data.setup("fit")
    missing = data.missing_class_images()
    if data.num_class_images and data.reg_config is not None and data.class_folder is None:
        raise UserError("data.params.num_class_images is set but there is no class folder: pass --reg_data_root")
    for folder, _, _ in data.class_image_jobs():  # generated class images must have somewhere to go
        ensure_writable_dir(folder, "--reg_data_root")
    if missing and resuming:
        folders = ", ".join(folder for folder, _, _ in data.class_image_jobs())
        raise UserError(f"{folders}: {missing} class images are missing; a resumed run does not generate them (the "
                        "base model is not loaded): restore the folder or lower num_class_images")
    for concept, config in zip(data.concepts, data.concept_configs):
        named = f" ({concept.name})" if len(data.concepts) > 1 else ""
        say(f"instance images{named}: {len(concept.instance.paths)} in {config.train.params.data_root}, "
            f"e.g. caption '{concept.instance.captions[0]}'")
        if concept.class_prior is not None:
            say(f"class images{named}: {len(concept.class_prior.paths)} in {config.reg.params.data_root}, "
                f"e.g. caption '{concept.class_prior.captions[0]}'")
    return data, missing


def set_learning_rate(model: pl.LightningModule, config: DictConfig, trainer: pl.Trainer, scale_lr: bool) -> None:
    """base_learning_rate, or with --scale_lr that times devices x batch size x gradient accumulation; the text
    encoder's own cond_stage_lr, when set, is scaled by the same factor."""
    base_lr, batch_size = config.model.base_learning_rate, config.data.params.batch_size
    factor, why = 1.0, "base_learning_rate, not scaled"
    if scale_lr:
        accumulate, n_devices = trainer.accumulate_grad_batches, trainer.num_devices * trainer.num_nodes
        factor = accumulate * n_devices * batch_size
        why = (f"{accumulate} (accumulate_grad_batches) x {n_devices} (devices) x {batch_size} (batch size) "
               f"x {base_lr:.2e} (base_learning_rate)")
    model.learning_rate = factor * base_lr
    say(f"learning rate {model.learning_rate:.2e} ({why})" if not scale_lr
        else f"learning rate {model.learning_rate:.2e} = {why}")
    if getattr(model, "cond_stage_lr", None) is not None:
        model.cond_stage_lr = factor * config.model.params.cond_stage_lr
        say(f"text encoder learning rate {model.cond_stage_lr:.2e} (cond_stage_lr"
            + (f" x {factor:g})" if scale_lr else ")"))
    if getattr(model, "embedding", None) is not None:
        model.embedding_lr = factor * model.embedding.learning_rate
        say(f"embedding learning rate {model.embedding_lr:.2e} (model.params.embedding.lr"
            + (f" x {factor:g})" if scale_lr else ")"))


def fit(trainer: pl.Trainer, model: pl.LightningModule, data: pl.LightningDataModule, run: Run) -> int:
    """Train; a NaN loss, a full disk, Ctrl-C or SIGTERM ends the run with a message and the exit status."""
    checkpoints = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
    os.environ[RUN_DIR_ENV] = str(run.logdir)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=str(run.checkpoint) if run.checkpoint else None)
    except FloatingPointError as err:
        kept = f"last good checkpoint: {checkpoints.last_good}" if checkpoints.last_good else "no checkpoint written"
        raise UserError(f"{err} ({kept})") from None
    except DiskFullError as err:
        raise UserError(f"{err}; {checkpoints.resume_hint()}") from None
    except SIGTERMException:
        checkpoints.stop_reason = "SIGTERM"
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if checkpoints.stop_reason:
        say(f"stopped by {checkpoints.stop_reason} at step {trainer.global_step}; "
            f"{checkpoints.stop_message(trainer.global_step)}")
        return 143 if checkpoints.stop_reason == "SIGTERM" else 130
    # (under ddp_spawn the callbacks ran in the workers, and this process's trainer is still at step 0)
    if not next(c for c in trainer.callbacks if isinstance(c, StepProgress)).trained and trainer.global_step:
        say(f"nothing to train: {run.checkpoint} is at step {trainer.global_step}, which is max_steps; pass "
            f"--max_steps above {trainer.global_step} to train further")
    return 0


def train(opt: argparse.Namespace, overrides: list[str]) -> int:
    if not opt.train and not opt.resume:
        raise UserError("nothing to do: pass -t/--train")
    if opt.name and opt.resume:
        raise UserError("-n/--name and -r/--resume cannot be used together: a resumed run keeps its folder")
    if not opt.resume and not opt.actual_resume:
        raise UserError("--actual_resume is required: the Stable Diffusion v1 checkpoint to fine-tune")
    if not opt.resume:
        check_checkpoint_file(opt.actual_resume, "--actual_resume")
    set_threads(opt.threads)
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    run = run_folder(opt, now)
    if not takes_run_lock():
        return train_run(opt, overrides, run, now)
    with run_lock(run.logdir, run.created):
        return train_run(opt, overrides, run, now)


def train_run(opt: argparse.Namespace, overrides: list[str], run: Run, now: str) -> int:
    """Train in the run folder that `train` chose (and locked)."""
    config = load_run_config(run.configs, overrides)
    apply_flags(config, opt)
    check_config(config)  # every key known, every value of its type, before anything is built
    lightning = config.pop("lightning")
    lightning.trainer = trainer_options(lightning.get("trainer") or OmegaConf.create(), opt)
    fix_step_fractions(config, lightning.trainer.max_steps)
    if run.weights and run.step >= lightning.trainer.max_steps:
        raise UserError(f"{run.weights} is at step {run.step} and max_steps is {lightning.trainer.max_steps}: pass "
                        f"--max_steps above {run.step} to train further")
    if run.weights:
        warn_fresh_optimizer(run)
    pl.seed_everything(opt.seed, workers=True)
    data, missing = prepare_data(config, resuming=run.checkpoint is not None or run.weights is not None)
    if missing and launched_per_process():
        raise UserError(f"{data.class_image_jobs()[0][0]}: {missing} class images are missing, and every process "
                        "would generate them at once: generate them first, with one process "
                        "(scripts/stable_txt2img.py, or a run with --num_class_images on one device)")

    if data.grouped():  # its batch sampler (ldm/data/buckets.py) takes each rank's batches itself
        lightning.trainer.use_distributed_sampler = False
    model = load_model(config, run, opt)
    torch.set_float32_matmul_precision(FLOAT32_MATMUL_PRECISION)  # TF32 matmuls: faster, and fine for training
    if opt.resume and opt.actual_resume:
        say(f"resuming: the weights come from {run.checkpoint or run.weights}, not --actual_resume {opt.actual_resume}")
    try:
        trainer = pl.Trainer(default_root_dir=str(run.logdir), logger=make_loggers(run.logdir, now),
                             callbacks=make_callbacks(lightning, run, now, config, opt.seed),
                             plugins=[AtomicCheckpointIO()], enable_checkpointing=False, **lightning.trainer)
    except (MisconfigurationException, ValueError) as err:  # Lightning refuses a value (--precision foo, ...)
        raise UserError(f"lightning.trainer: {err}") from None
    check_training_precision(trainer.strategy.root_device, str(trainer.precision))
    bucket_view_gradients(trainer.strategy)
    set_learning_rate(model, config, trainer, opt.scale_lr)
    for folder, class_word, count in data.class_image_jobs():
        say(f"generating {count} class images in {folder} with the base model")
        device = trainer.strategy.root_device  # a half-precision copy samples there; the model waits for fit
        generate_class_images(model, folder, class_word, count, seed=opt.seed, device=device,
                              dtype=generation_dtype(str(trainer.precision), device),
                              checkpoint=weights_file(config, run, opt), **data.class_generation)
    if missing:
        data.setup("fit")
    if data.cache_latents:
        cache_latents(model, data, run.logdir / "cache", trainer.strategy.root_device, run.checkpoint)
    # the training stream starts from the seed, whatever building, loading and class-image generation drew before;
    # RankSeed then gives each DDP rank its own (data shuffling keeps this one on every rank)
    pl.seed_everything(opt.seed, workers=True, verbose=False)
    return fit(trainer, model, data, run)


def bucket_view_gradients(strategy: Strategy) -> None:
    """Under DDP each gradient is a view of its all-reduce bucket, so that the gradients are held once, not twice;
    Lightning hands a DDPStrategy's extra arguments to DistributedDataParallel, however the strategy was chosen."""
    if isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs.setdefault("gradient_as_bucket_view", True)


def load_model(config: DictConfig, run: Run, opt: argparse.Namespace) -> pl.LightningModule:
    """The model with the weights it starts from. Weights that load before fit are built on the meta device (no
    random init, one copy of them in memory); a resumed last.ckpt is loaded by Lightning into a model built as usual.
    A LoRA run loads its base checkpoint, injects LoRA, then its step file's LoRA (Lightning loads last.ckpt's); a
    textual-inversion run loads its base too. An embedding starts from its init word or a step file's embedding."""
    lora, embedding = config.model.params.get("lora"), config.model.params.get("embedding")
    base_options, kind = ((lora, "lora") if lora else (embedding, "embedding") if embedding and not
                          embedding.get("pivotal") else (None, None))
    with parameters_on_meta() if run.checkpoint is None or base_options else contextlib.nullcontext():
        model = build(config.model, "model").train()
    if base_options:
        base = base_options.get("base_checkpoint")
        if not base:
            raise UserError(f"the run's config names no base checkpoint (model.params.{kind}.base_checkpoint)")
        run_kind = "LoRA run" if lora else "textual-inversion run"
        check_checkpoint_file(base, f"the base checkpoint of this {run_kind} (model.params.{kind}.base_checkpoint); "
                              "restore it or point the key at a copy")
        load_model_weights(model, base, use_ema=base_options.get("base_ema", False))
        if lora:
            model.inject_lora(model.unet_params)
        if run.weights and lora:
            model.load_lora_file(run.weights)
    elif run.checkpoint is None:
        load_model_weights(model, run.weights or opt.actual_resume, use_ema=opt.use_ema_weights and not run.weights)
    if embedding:
        model.add_embedding(run.weights)
    model.start_frozen_prior(resumed=run.checkpoint is not None or run.weights is not None)
    return model


def weights_file(config: DictConfig, run: Run, opt: argparse.Namespace) -> Optional[str]:
    """The file that load_model took the model's weights from before fit (a LoRA run's base), None for last.ckpt's,
    which Lightning loads in fit."""
    lora, embedding = config.model.params.get("lora"), config.model.params.get("embedding")
    if lora or (embedding and not embedding.get("pivotal")):
        return (lora or embedding).get("base_checkpoint")
    return None if run.checkpoint is not None else str(run.weights or opt.actual_resume)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    opt, overrides = parser.parse_known_args(argv)
    flags = [arg for arg in overrides if arg.startswith("-") or "=" not in arg]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)} (config overrides are written a.b=c)")
    quiet_lightning()
    # the other processes of a DDP run (launched by Lightning, torchrun or SLURM) show their warnings only
    level = logging.INFO if rank_zero_only.rank == 0 else logging.WARNING
    return run_command(lambda: train(opt, overrides), level=level)


if __name__ == "__main__":
    sys.exit(main())
