"""main.py's flags written into the run's config (data, model and Lightning keys), so that the saved config alone can
resume the run; and the parsers of its typed flags (`--gpus`, `--devices`, booleans)."""
import argparse
import logging

from omegaconf import DictConfig, OmegaConf

from ldm.data.concepts import concepts_from_flags
from ldm.data.personalized import DEFAULT_CLASS_WORD, DEFAULT_IDENTIFIER
from ldm.util import UserError

logger = logging.getLogger(__name__)


def apply_flags(config: DictConfig, opt: argparse.Namespace) -> None:
    """Write the command-line choices into the config, so that the saved config alone can resume the run."""
    data = config.data.params
    flags = {key: getattr(opt, key) for key in ("data_root", "reg_data_root", "class_word", "identifier")}
    for key, root in (("train", opt.data_root), ("reg", opt.reg_data_root)):
        if data.get(key) is None and root:
            raise UserError(f"--{'reg_' if key == 'reg' else ''}data_root given, but the config has no "
                            f"data.params.{key} dataset")
    if len(opt.data_root or []) > 1:
        data.concepts = concepts_from_flags(flags)
    elif data.get("concepts") and any(flags.values()):
        raise UserError("the config lists its subjects in data.params.concepts: edit them there, or pass --data_root "
                        "and --token once per subject to replace them")
    else:  # one subject: a flag given twice takes its last value, as before
        for key, root in (("train", opt.data_root), ("reg", opt.reg_data_root)):
            if data.get(key) is None:
                continue
            params = data[key].setdefault("params", {})
            for name, values in (("data_root", root), ("class_word", opt.class_word), ("identifier", opt.identifier)):
                if values:
                    params[name] = values[-1]
    if opt.num_class_images is not None:
        data.num_class_images = opt.num_class_images
    for key in ("class_prompt", "class_negative_prompt", "class_sampler"):
        if getattr(opt, key) is not None:
            data[key] = getattr(opt, key)
    if opt.class_prompt is not None and data.get("reg") is not None:
        data.reg.setdefault("params", {})["template"] = opt.class_prompt  # the class captions say what made them
    if opt.cache_latents:
        data.cache_latents = config.model.params.cache_text_embeddings = True
    if opt.freeze_text_encoder:
        config.model.params.cond_stage_trainable = False
        config.model.params.cond_stage_stop_step = None  # a config's stop step is moot (the flag with one is an error)
    if opt.text_encoder_lr is not None:
        config.model.params.cond_stage_lr = opt.text_encoder_lr
    if opt.clip_skip is not None:
        OmegaConf.update(config, "model.params.cond_stage_config.params.clip_skip", opt.clip_skip, merge=True)
    apply_saver_flags(config, opt)
    apply_lora_flags(config, opt)
    apply_embedding_flags(config, opt)
    apply_prior_flags(config, opt)
    lightning = config.setdefault("lightning", {})
    if opt.max_steps is not None:
        lightning.setdefault("trainer", {})["max_steps"] = opt.max_steps
    if opt.lr_scheduler is not None or opt.lr_warmup_steps is not None:
        if config.model.params.get("lr_schedule") is None:
            config.model.params.lr_schedule = {}
        schedule = config.model.params.lr_schedule
        if opt.lr_scheduler is not None:
            schedule.name = opt.lr_scheduler
        if opt.lr_warmup_steps is not None:
            schedule.warmup_steps = opt.lr_warmup_steps
            if "name" not in schedule:
                schedule.name = "constant_with_warmup"
    if opt.stop_text_encoder_training is not None:
        config.model.params.cond_stage_stop_step = opt.stop_text_encoder_training
    if opt.safetensors:
        lightning.setdefault("modelcheckpoint", {}).setdefault("params", {})["safetensors"] = True
    if opt.save_precision is not None:
        lightning.setdefault("modelcheckpoint", {}).setdefault("params", {})["save_precision"] = opt.save_precision


def apply_saver_flags(config: DictConfig, opt: argparse.Namespace) -> None:
    """The memory and speed flags, written into the model config (`--gradient_checkpointing` wins over a config's
    false; leaving a flag out keeps the config's value)."""
    params = config.model.params
    if opt.gradient_checkpointing:
        OmegaConf.update(config, "model.params.unet_config.params.use_checkpoint", True, merge=True)
        OmegaConf.update(config, "model.params.cond_stage_config.params.gradient_checkpointing", True, merge=True)
    if opt.optimizer is not None or opt.fused_backward:
        if params.get("optimizer") is None:
            params.optimizer = {}
        if opt.optimizer is not None:
            if params.optimizer.get("target") not in (None, opt.optimizer):
                params.optimizer.params = {}  # the config's options were for its own optimizer
            params.optimizer.target = opt.optimizer
        if opt.fused_backward:
            params.optimizer.fused_backward = True
    if opt.compile:
        params.compile_unet = True


def apply_lora_flags(config: DictConfig, opt: argparse.Namespace) -> None:
    """`--rank` and the LoRA options into `model.params.lora`, and a new LoRA run's base checkpoint (which a resumed
    run loads again before its LoRA weights)."""
    params = config.model.params
    options = {"rank": opt.rank, "alpha": opt.lora_alpha, "targets": opt.lora_targets,
               "text_encoder": opt.lora_text_encoder or None, "network": opt.network, "factor": opt.factor}
    given = {key: value for key, value in options.items() if value is not None}
    if given and not params.get("lora") and opt.rank is None:
        flags = {"alpha": "--lora_alpha", "targets": "--lora_targets", "text_encoder": "--lora_text_encoder",
                 "network": "--network", "factor": "--factor"}
        raise UserError(f"{' and '.join(flags[key] for key in given)}: LoRA options; add --rank N, or use "
                        "configs/stable-diffusion/v1-finetune_lora.yaml")
    if given:
        if params.get("lora") is None:
            params.lora = {}
        params.lora.update(given)
        params.cond_stage_trainable = bool(params.lora.get("text_encoder", False))
        params.cond_stage_stop_step = None if not params.cond_stage_trainable else params.get("cond_stage_stop_step")
    if params.get("lora") and not opt.resume:
        params.lora.base_checkpoint, params.lora.base_ema = opt.actual_resume, opt.use_ema_weights


def apply_embedding_flags(config: DictConfig, opt: argparse.Namespace) -> None:
    """`--train_embedding` and its options into `model.params.embedding` (the token and init word default to the
    data's identifier and class word); the text encoder is frozen but for its LoRA; a new textual-inversion run's
    base checkpoint (which a resumed run loads again before its vectors)."""
    params = config.model.params
    options = {"num_vectors": opt.num_vectors, "init_word": opt.init_word, "lr": opt.embedding_lr,
               "stop_step": opt.embedding_stop_step, "pivotal": opt.pivotal or None}
    given = {key: value for key, value in options.items() if value is not None}
    if given and not opt.train_embedding and not params.get("embedding"):
        flags = {"num_vectors": "--num_vectors", "init_word": "--init_word", "lr": "--embedding_lr",
                 "stop_step": "--embedding_stop_step", "pivotal": "--pivotal"}
        raise UserError(f"{' and '.join(flags[key] for key in given)}: options of the trained embedding; add "
                        "--train_embedding")
    if opt.train_embedding:
        if params.get("embedding") is None:
            params.embedding = {}
        train = OmegaConf.select(config, "data.params.train.params") or {}
        if opt.identifier or "token" not in params.embedding:
            params.embedding.token = opt.identifier[-1] if opt.identifier else train.get("identifier",
                                                                                         DEFAULT_IDENTIFIER)
        if "init_word" not in params.embedding:
            params.embedding.init_word = train.get("class_word", DEFAULT_CLASS_WORD)
        if params.get("cond_stage_trainable") and not params.get("lora"):
            logger.info("--train_embedding: the text encoder is frozen (its new vectors train)")
            params.cond_stage_trainable, params.cond_stage_stop_step = False, None
    if params.get("embedding"):
        params.embedding.update(given)
        if not params.get("lora") and not opt.resume:
            params.embedding.base_checkpoint, params.embedding.base_ema = opt.actual_resume, opt.use_ema_weights


def apply_prior_flags(config: DictConfig, opt: argparse.Namespace) -> None:
    """`--prior` into `model.params.prior_preservation`. With frozen_model no class image is used or generated: the
    class dataset and num_class_images are dropped (each with an info line), every instance example carries its
    class prompt, and a new full fine-tune records its base checkpoint, which a resume reads the frozen copy from."""
    params, data = config.model.params, config.data.params
    if opt.prior is not None:
        params.prior_preservation = opt.prior
    if params.get("prior_preservation", "class_images") != "frozen_model":
        return
    reg_params = (data.get("reg") or {}).get("params") or {}
    roots = [reg_params.get("data_root")] + [concept.get("reg_data_root") for concept in data.get("concepts") or []]
    roots = sorted({str(root) for root in roots if root})
    if roots:
        logger.info("--prior frozen_model: the class images in %s are not used (the frozen base model gives the "
                    "class term's target)", ", ".join(roots))
    data.reg = None
    if data.get("num_class_images"):
        logger.info("--prior frozen_model: no class images are generated (num_class_images %d is not used)",
                    data.num_class_images)
        data.num_class_images = 0
    data.prior_captions = True
    if not params.get("lora") and not opt.resume:
        params.prior_base_checkpoint, params.prior_base_ema = opt.actual_resume, opt.use_ema_weights


def fix_step_fractions(config: DictConfig, max_steps: int) -> None:
    """Steps given as a fraction of max_steps (the text encoder's and the embedding's stop steps, the learning-rate
    warmup) become steps when the run starts, written into the config the run saves, so that a resume with a larger
    --max_steps keeps them where they were."""
    params = config.model.params
    stop = params.get("cond_stage_stop_step")
    if stop is not None and 0 < stop < 1:
        params.cond_stage_stop_step = max(1, round(stop * max_steps))
        logger.info("the text encoder trains until step %d (%g of max_steps %d; model.params.cond_stage_stop_step)",
                    params.cond_stage_stop_step, stop, max_steps)
    embedding = params.get("embedding")
    stop = embedding.get("stop_step") if embedding else None
    if stop is not None and 0 < stop < 1:
        embedding.stop_step = max(1, round(stop * max_steps))
        logger.info("the embedding trains until step %d (%g of max_steps %d; model.params.embedding.stop_step)",
                    embedding.stop_step, stop, max_steps)
    schedule = params.get("lr_schedule")
    warmup = schedule.get("warmup_steps") if schedule is not None else None
    if warmup is not None and 0 < warmup < 1:
        schedule.warmup_steps = round(warmup * max_steps)  # as LRSchedule.warmup rounds a fraction
        logger.info("the learning rate warms up over %d steps (%g of max_steps %d; model.params.lr_schedule)",
                    schedule.warmup_steps, warmup, max_steps)


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def parse_gpus(text: str) -> int | list[int]:
    """Lightning 1.x `--gpus`: '0,' and '0,1' are GPU indices, a bare number is a count (-1: all)."""
    try:
        if "," in text:
            return [int(index) for index in text.split(",") if index.strip()]
        return int(text)
    except ValueError:
        raise UserError(f"--gpus {text!r}: expected GPU indices such as '0,' or '0,1', or a count such as 2") from None


def parse_devices(text: str) -> int | list[int] | str:
    if text == "auto":
        return text
    return parse_gpus(text)
