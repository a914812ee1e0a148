"""ControlNets at sampling time: the flags, the hints (Canny or ready-made maps), the ControlNet files built for the
model's UNet, and what every image's metadata records of them."""
import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.checkpoint import check_checkpoint_file, load_controlnet_weights, parameters_on_meta
from ldm.config import vae_factor
from ldm.controlnet.hints import canny, hint_image, read_hint
from ldm.controlnet.stack import Control, ControlStack
from ldm.data.image_files import DataError, open_image
from ldm.images import save_image
from ldm.modules.controlnet import HINT_DOWNSAMPLING, ControlNet
from ldm.util import UserError, file_sha256

logger = logging.getLogger(__name__)
PREPROCESSORS = ("canny", "none")
T = TypeVar("T")


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """--controlnet and its companions; each per-ControlNet flag is given once (for all) or once per ControlNet."""
    add = parser.add_argument
    add("--controlnet", action="append", default=[], metavar="FILE",
        help="an SD 1.5 ControlNet (control_v11p_sd15_canny.pth, control_sd15_depth.safetensors, ...); repeatable")
    add("--control_image", action="append", default=[], metavar="IMG", help="its input image (one per --controlnet)")
    add("--control", action="append", default=[], choices=PREPROCESSORS,
        help="canny: edges of the image (default); none: the image is already a hint map (depth, pose, edges, ...)")
    add("--control_strength", action="append", default=[], type=float, help="weight of its residuals (default 1)")
    add("--control_start", action="append", default=[], type=float,
        help="fraction of the sampling steps at which it starts acting (default 0)")
    add("--control_end", action="append", default=[], type=float,
        help="fraction of the sampling steps after which it stops (default 1)")
    add("--canny_low", type=float, default=100.0, help="Canny's low threshold (OpenCV's units)")
    add("--canny_high", type=float, default=200.0, help="Canny's high threshold (OpenCV's units)")
    add("--guess_mode", action="store_true",
        help="the unconditional branch gets no control, residuals weighted 0.825 ** (12 - i) (for empty prompts)")


def per_controlnet(values: Sequence[T], count: int, default: T, flag: str) -> list[T]:
    """One value per ControlNet: none given (the default), one (for all) or exactly `count`."""
    if not values:
        return [default] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise UserError(f"{flag} is given {len(values)} times for {count} ControlNets; give it once or once each")
    return list(values)


def check_control_options(opt: argparse.Namespace, config: DictConfig) -> list[dict]:
    """Each ControlNet's settings, checked before any model is loaded."""
    if not opt.controlnet:
        if opt.control_image:
            raise UserError("--control_image needs a --controlnet FILE")
        return []
    count = len(opt.controlnet)
    if len(opt.control_image) != count:
        raise UserError(f"{count} --controlnet files need {count} --control_image (one each), got "
                        f"{len(opt.control_image)}")
    if vae_factor(config) != HINT_DOWNSAMPLING:
        raise UserError(f"ControlNets are built for autoencoders with f={HINT_DOWNSAMPLING} (SD v1); this config's "
                        f"is f={vae_factor(config)}")
    settings = [dict(file=f, image=i, control=c, strength=s, start=a, end=b) for f, i, c, s, a, b in zip(
        opt.controlnet, opt.control_image, per_controlnet(opt.control, count, "canny", "--control"),
        per_controlnet(opt.control_strength, count, 1.0, "--control_strength"),
        per_controlnet(opt.control_start, count, 0.0, "--control_start"),
        per_controlnet(opt.control_end, count, 1.0, "--control_end"))]
    for setting in settings:
        check_checkpoint_file(setting["file"], "--controlnet takes an SD 1.5 ControlNet .pth or .safetensors")
        try:
            open_image(setting["image"]).close()
        except (OSError, DataError) as err:
            raise UserError(f"--control_image {setting['image']}: cannot read it as an image ({err})") from None
        if setting["strength"] < 0:
            raise UserError(f"--control_strength {setting['strength']} must be at least 0")
        if not 0 <= setting["start"] < setting["end"] <= 1:
            raise UserError(f"--control_start {setting['start']} and --control_end {setting['end']}: need "
                            "0 <= start < end <= 1")
    if any(s["control"] == "canny" for s in settings) and not 0 <= opt.canny_low <= opt.canny_high:
        raise UserError(f"--canny_low {opt.canny_low} and --canny_high {opt.canny_high}: need 0 <= low <= high")
    return settings


def controlnet_params(model_config: DictConfig) -> dict:
    """The ControlNet of a model's UNet: the same encoder options, a 3-channel hint (configs/controlnet/ spell
    them out for SD 1.5)."""
    params = OmegaConf.to_container(model_config.model.params.unet_config.params, resolve=True)
    params.pop("out_channels", None)
    return {**params, "hint_channels": 3}


def load_controlnet(path: str, params: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A ControlNet built from `params` (on the meta device: no random init) with the weights of `path` loaded at
    `dtype` (the UNet's: half precision on a GPU)."""
    with parameters_on_meta():
        net = ControlNet(**params).to(dtype)
    load_controlnet_weights(net, path)
    return net.eval().requires_grad_(False).to(device)


def make_hint(setting: dict, width: int, height: int, opt: argparse.Namespace) -> torch.Tensor:
    """The hint of one ControlNet at the output size: the image itself, or its Canny edges."""
    image = read_hint(setting["image"], width, height)
    return canny(image, opt.canny_low, opt.canny_high) if setting["control"] == "canny" else image


def build_controls(opt: argparse.Namespace, settings: list[dict], model_config: DictConfig, size: tuple[int, int],
                   device: torch.device, dtype: torch.dtype, hint_stem: Path) -> tuple[Optional[ControlStack],
                                                                                   list[dict]]:
    """The ControlStack for `settings` at `size` (width, height), each hint saved as `<hint_stem>-<i>.png`, and the
    metadata records of the ControlNets; (None, []) without ControlNets."""
    if not settings:
        return None, []
    params, controls, records = controlnet_params(model_config), [], []
    for i, setting in enumerate(settings):
        hint = make_hint(setting, *size, opt)
        hint_path = hint_stem.with_name(f"{hint_stem.name}-{i}.png")
        save_image(hint_image(hint), hint_path, {"control": setting["control"], "image": Path(setting["image"]).name})
        net = load_controlnet(setting["file"], params, device, dtype)
        controls.append(Control(net, hint.to(device), setting["strength"], setting["start"], setting["end"]))
        record = {"file": Path(setting["file"]).name, "sha256": file_sha256(setting["file"]),
                  "control": setting["control"], "strength": setting["strength"], "start": setting["start"],
                  "end": setting["end"], "hint": hint_path.name}
        if setting["control"] == "canny":
            record.update(canny_low=opt.canny_low, canny_high=opt.canny_high)
        records.append(record)
        logger.info("ControlNet %d: %s (%s, strength %g, steps %g..%g), hint %s", i, record["file"],
                    setting["control"], setting["strength"], setting["start"], setting["end"], hint_path)
    return ControlStack(controls, opt.guess_mode), records
