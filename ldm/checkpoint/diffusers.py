"""Our Stable Diffusion v1 models in diffusers' terms, the one place for diffusers-side names and conventions: the
UNet config, and diffusers pipeline folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
read into and written from the SD v1 layout.

The key names are diffusers' own: its CompVis -> diffusers converters (`diffusers.loaders.single_file_utils`) run on
a model built on the meta device, and every tensor they return is followed back to the SD tensor it is (or is a
view of). The reverse direction, which diffusers' wheel lacks, inverts that map, so both use one table."""
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint.files import REQUIRED_GROUPS, CheckpointError, group_of, read_weight_file
from ldm.checkpoint.loading import check_compatible, parameters_on_meta
from ldm.checkpoint.writing import save_weights
from ldm.config import DEFAULT_CONFIG, native_size, read_yaml
from ldm.modules.encoders.modules import TEXT_CONFIG_KEYS, TOKENIZER_DIR, build_text_config, load_tokenizer
from ldm.util import UserError, atomic_write_text, import_offline, instantiate_from_config, read_json

PARTS = ("unet", "vae", "text_encoder")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
TEXT_MODEL = "text_model."  # transformers 4 (and the hub's files) name the text encoder's tensors under it


def diffusers_unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel arguments equivalent to our UNetModel `params` (SD v1 conventions)."""
    mult = params["channel_mult"]
    attn = [2 ** level in params["attention_resolutions"] for level in range(len(mult))]
    return dict(sample_size=params["image_size"], in_channels=params["in_channels"],
                out_channels=params["out_channels"],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                block_out_channels=[params["model_channels"] * m for m in mult],
                layers_per_block=params["num_res_blocks"],
                transformer_layers_per_block=params.get("transformer_depth", 1),
                cross_attention_dim=params["context_dim"],
                attention_head_dim=params["num_heads"],  # SD v1 quirk: diffusers reads this as the number of heads
                norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def single_file_utils():
    """diffusers' conversion module (an optional dependency: only folder conversions need it)."""
    try:
        utils = import_offline("diffusers.loaders.single_file_utils")
    except ImportError:
        raise UserError("diffusers folders are converted with diffusers' own key tables: pip install diffusers "
                        "(nothing is downloaded)") from None
    return utils


class DiffusersName(NamedTuple):
    part: str  # unet, vae or text_encoder
    key: str
    shape: tuple[int, ...]  # the diffusers tensor's shape (VAE attention: a linear weight for SD's 1x1 conv)
    sd_shape: tuple[int, ...]


def model_on_meta(config: DictConfig) -> torch.nn.Module:
    """The model of `config` with its parameters on the meta device (its noise schedule buffers are real)."""
    with parameters_on_meta():
        return instantiate_from_config(config.model)


def diffusers_names(config: DictConfig, model: Optional[torch.nn.Module] = None) -> dict[str, DiffusersName]:
    """The diffusers name and shape of every UNet, VAE and text-encoder tensor of an SD v1 model of `config`."""
    utils = single_file_utils()
    model = model_on_meta(config) if model is None else model
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if group_of(k) in REQUIRED_GROUPS}
    sources = {id(tensor): key for key, tensor in state.items()}
    original = OmegaConf.to_container(config, resolve=True)
    converted = {"unet": utils.convert_ldm_unet_checkpoint(state, utils.create_unet_diffusers_config_from_ldm(
                     original, state)),
                 "vae": utils.convert_ldm_vae_checkpoint(state, utils.create_vae_diffusers_config_from_ldm(
                     original, state)),
                 "text_encoder": utils.convert_ldm_clip_checkpoint(state)}
    names = {}
    for part, tensors in converted.items():
        for key, tensor in tensors.items():
            source = sources.get(id(tensor), sources.get(id(tensor._base)))
            if source is None:
                raise RuntimeError(f"diffusers {part}/{key} is not one of the SD tensors: its converter changed")
            names[source] = DiffusersName(part, key, tuple(tensor.shape), tuple(state[source].shape))
    unnamed = [k for k in state if k not in names and not k.endswith("position_ids")]
    if unnamed:
        raise RuntimeError(f"diffusers' converters name no tensor for {len(unnamed)} SD keys, e.g. {unnamed[0]}")
    return names


def folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """The JSON configs of a pipeline folder's parts (and its scheduler's, when it has one)."""
    configs = {}
    for part, name in [*((p, "config.json") for p in PARTS), ("scheduler", "scheduler_config.json")]:
        path = folder / part / name
        if not path.is_file():
            if part == "scheduler":
                continue
            raise CheckpointError(f"{folder} is a diffusers folder without {part}/{name}: not a Stable Diffusion "
                                  "pipeline")
        configs[part] = read_json(path)
    for part, expected in CLASSES.items():
        found = configs[part].get("_class_name") or (configs[part].get("architectures") or [expected])[0]
        if found != expected:
            raise CheckpointError(f"{folder}/{part} holds a {found}, not an SD v1 {expected}")
    unet = configs["unet"]
    if unet.get("use_linear_projection") or not isinstance(unet.get("attention_head_dim", 8), int):
        raise CheckpointError(f"{folder} is a Stable Diffusion 2.x or XL pipeline; this tool trains and samples SD v1 "
                              "only")
    return configs


def sd_config_for_folder(folder: Path) -> DictConfig:
    """Our model config for the pipeline in `folder`: the SD v1 inference config with the folder's sizes."""
    configs = folder_configs(folder)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    config = read_yaml(DEFAULT_CONFIG)
    params, base = config.model.params, unet["block_out_channels"][0]
    params.unet_config.params.update(
        image_size=unet["sample_size"], in_channels=unet["in_channels"], out_channels=unet["out_channels"],
        model_channels=base, channel_mult=[c // base for c in unet["block_out_channels"]],
        num_res_blocks=unet["layers_per_block"], context_dim=unet["cross_attention_dim"],
        attention_resolutions=[2 ** i for i, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind],
        num_heads=unet.get("attention_head_dim", 8), transformer_depth=unet.get("transformer_layers_per_block", 1))
    vae_base = vae["block_out_channels"][0]
    params.first_stage_config.params.embed_dim = vae["latent_channels"]
    params.first_stage_config.params.ddconfig.update(
        z_channels=vae["latent_channels"], resolution=vae["sample_size"], in_channels=vae["in_channels"],
        out_ch=vae["out_channels"], ch=vae_base, ch_mult=[c // vae_base for c in vae["block_out_channels"]],
        num_res_blocks=vae["layers_per_block"])
    params.scale_factor = vae.get("scaling_factor", params.scale_factor)
    params.channels, params.image_size = unet["in_channels"], unet["sample_size"]
    params.cond_stage_config.params = {"text_config": {k: v for k, v in text.items() if k in TEXT_CONFIG_KEYS
                                                       and isinstance(v, (int, float, str))}}
    scheduler = configs.get("scheduler", {})
    params.linear_start = scheduler.get("beta_start", params.linear_start)
    params.linear_end = scheduler.get("beta_end", params.linear_end)
    params.timesteps = scheduler.get("num_train_timesteps", params.timesteps)
    return config


def weight_file(folder: Path, part: str) -> Path:
    """The part's weights: `.safetensors` before `.bin`, the full-precision file before an fp16 variant."""
    stems = (WEIGHT_STEMS[part], "pytorch_model") if part == "text_encoder" else (WEIGHT_STEMS[part],)
    for name in [f"{stem}{variant}{suffix}" for suffix in (".safetensors", ".bin") for variant in ("", ".fp16")
                 for stem in stems]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise CheckpointError(f"{folder / part} holds no weights ({WEIGHT_STEMS[part]}.safetensors or .bin); sharded "
                    "weights are not supported")


def read_diffusers_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text-encoder weights under SD v1 keys, in the folder's own sizes, and the noise
    schedule of its scheduler config, as an SD v1 file holds them."""
    folder = Path(folder)
    config = sd_config_for_folder(folder)
    model = model_on_meta(config)
    names = diffusers_names(config, model)
    tensors = {}
    for part in PARTS:
        file_tensors = read_weight_file(weight_file(folder, part))[0]
        if part == "text_encoder":  # transformers 5 writes the text encoder's tensors without `text_model.`
            file_tensors = {k if k.startswith(TEXT_MODEL) else TEXT_MODEL + k: v for k, v in file_tensors.items()}
        tensors[part] = file_tensors
    state = {}
    for sd_key, name in names.items():
        value = tensors[name.part].get(name.key)
        if value is None:
            raise CheckpointError(f"{folder}/{name.part} has no {name.key}: not an SD v1 pipeline folder")
        if tuple(value.shape) != name.shape:
            raise CheckpointError(f"{folder}/{name.part}: {name.key} has shape {tuple(value.shape)}, its config "
                                  f"says {name.shape}")
        state[sd_key] = value.reshape(name.sd_shape)
    state.update({k: v for k, v in model.state_dict().items() if group_of(k) == "noise schedule"})
    return state


def scheduler_config(params: DictConfig) -> dict[str, Any]:
    """DDIMScheduler settings equal to our DDIM sampler (`clip_sample: false`, SD's leading spacing, offset 1)."""
    return {"_class_name": "DDIMScheduler", "beta_start": params.linear_start, "beta_end": params.linear_end,
            "beta_schedule": "scaled_linear", "num_train_timesteps": params.timesteps, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


def write_diffusers_folder(state: Mapping[str, torch.Tensor], config: DictConfig, folder: str | Path,
                           dtype: Optional[torch.dtype] = None) -> list[Path]:
    """A StableDiffusionPipeline folder from SD v1 weights of `config`'s model, written offline: the configs built
    here, the tokenizer from our package files; returns the files written."""
    utils, folder = single_file_utils(), Path(folder)
    import diffusers
    model = model_on_meta(config)
    check_compatible(model.state_dict(), state, "the weights")
    names = diffusers_names(config, model)
    original, params = OmegaConf.to_container(config, resolve=True), config.model.params
    version = {"_diffusers_version": diffusers.__version__}
    part_configs = {"unet": utils.create_unet_diffusers_config_from_ldm(original, state),
                    "vae": utils.create_vae_diffusers_config_from_ldm(original, state)}
    # The model's own sizes, which the pipeline samples at by default (diffusers' converters assume SD's 512 px).
    part_configs["unet"]["sample_size"], part_configs["vae"]["sample_size"] = params.image_size, native_size(config)
    written = []
    for part in PARTS:
        (folder / part).mkdir(parents=True, exist_ok=True)
        tensors = {n.key: state[k].reshape(n.shape).contiguous() for k, n in names.items() if n.part == part}
        path = folder / part / f"{WEIGHT_STEMS[part]}.safetensors"
        save_weights(tensors, path, metadata={"format": "pt"}, dtype=dtype)
        written.append(path)
        if part in part_configs:
            text = json.dumps({"_class_name": CLASSES[part], **version, **part_configs[part]}, indent=2)
            atomic_write_text(folder / part / "config.json", text)
    text_params = OmegaConf.select(config, "model.params.cond_stage_config.params.text_config")
    text_config = build_text_config(OmegaConf.to_container(text_params) if text_params is not None else None)
    text_config.architectures = [CLASSES["text_encoder"]]
    text_config.save_pretrained(folder / "text_encoder")
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    tokenizer.model_max_length = text_config.max_position_embeddings  # our files leave it unset (1e30)
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    atomic_write_text(folder / "scheduler" / "scheduler_config.json",
                      json.dumps({**scheduler_config(params), **version}, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", **version, "requires_safety_checker": False,
             "feature_extractor": [None, None], "safety_checker": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2))
    return written
