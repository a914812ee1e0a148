"""ControlNet: the SD 1.5 key layout at full size, parity with diffusers' ControlNetModel feeding UNet2DConditionModel,
and the loading rules of the original files (prefix or none, a whole SD model beside it, SD 2, missing parts)."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, load_controlnet_weights, read_controlnet, save_weights
from ldm.config import load_config
from ldm.controlnet.options import controlnet_params
from ldm.modules.controlnet import ControlNet
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import count_params, instantiate_from_config
from tests.helpers.repo import TINY_CONFIG
from tests.modules.test_unet import SECOND_CONFIG, diffusers_twin, randomise, unet_params

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "tests" / "fixtures" / "sd15-controlnet-state-dict.tsv"  # a copy of the project's shared spec
PREFIX = "control_model."
TINY_CONTROLNET = controlnet_params(load_config(str(TINY_CONFIG)))


def read_controlnet_spec() -> dict[str, tuple[int, ...]]:
    lines = (line.split("\t") for line in SPEC.read_text().splitlines())
    return {key: tuple(int(n) for n in shape.split(",")) for key, shape in lines}


def control_stage(config: str):
    return OmegaConf.load(ROOT / "configs" / config).model.params.control_stage_config


def test_full_size_controlnet_has_the_spec_keys_and_shapes_on_meta() -> None:
    expected = read_controlnet_spec()
    assert len(expected) == 340 and all(k.startswith(PREFIX) for k in expected)
    with torch.device("meta"):
        net = instantiate_from_config(control_stage("controlnet/cldm_v15.yaml"))
    got = {PREFIX + k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: (got[k], v) for k, v in expected.items() if got[k] != v} == {}
    n = count_params(net)
    print(f"full-size SD 1.5 ControlNet: {n / 1e6:.2f} M parameters")
    assert round(n / 1e6, 2) == 361.28


@pytest.mark.parametrize("model_config,controlnet_config", [("stable-diffusion/v1-inference.yaml",
                                                              "controlnet/cldm_v15.yaml"),
                                                             ("tiny/v1-inference.yaml", "tiny/cldm_v15.yaml")])
def test_the_configs_spell_out_the_controlnet_of_the_models_unet(model_config, controlnet_config) -> None:
    derived = controlnet_params(load_config(str(ROOT / "configs" / model_config)))
    assert OmegaConf.to_container(control_stage(controlnet_config).params) == derived


def random_pair(params: dict, seed: int) -> tuple[UNetModel, ControlNet]:
    """A UNet and its ControlNet with every weight random (the zero convs too)."""
    unet = UNetModel(**params).eval()
    net = ControlNet(**{k: v for k, v in params.items() if k != "out_channels"}, hint_channels=3).eval()
    randomise(unet, seed)
    randomise(net, seed + 1)
    return unet, net


def diffusers_controlnet(unet, net: ControlNet):
    """diffusers' ControlNetModel for `unet` (a diffusers UNet), `net`'s weights through its single-file converter."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the parity test")
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_controlnet_checkpoint
    theirs = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    state = {PREFIX + k: v for k, v in net.state_dict().items()}
    theirs.load_state_dict(convert(state, dict(theirs.config)), strict=True)
    return theirs.eval()


@pytest.mark.parametrize("params,size", [(unet_params("tiny/v1-inference.yaml"), (8, 8)), (SECOND_CONFIG, (8, 12))],
                         ids=["tiny", "three-levels"])
def test_controlled_unet_matches_diffusers(params: dict, size: tuple[int, int]) -> None:
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    unet, net = random_pair(params, seed=3)
    their_unet = diffusers_twin(params).eval()
    their_unet.load_state_dict(convert({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
                                       dict(their_unet.config)), strict=True)
    their_net = diffusers_controlnet(their_unet, net)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, params["in_channels"], *size, generator=g)
    hint = torch.rand(2, 3, 8 * size[0], 8 * size[1], generator=g)
    t, context = torch.tensor([11, 780]), torch.randn(2, 5, params["context_dim"], generator=g)
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        ours = unet(x, t, context, control=residuals)
        down, mid = their_net(x, t, context, controlnet_cond=hint, return_dict=False)
        theirs = their_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        plain = unet(x, t, context)
    assert len(residuals) == len(down) + 1
    for a, b in zip(residuals, [*down, mid]):
        assert (a - b).abs().max() <= 1e-5
    error = (ours - theirs).abs().max().item()
    print(f"{params['model_channels']} channels, {len(params['channel_mult'])} levels: max |ours - diffusers| = "
          f"{error:.1e}; the control moved the output by {(ours - plain).abs().max():.2f}")
    assert error <= 1e-5
    assert (ours - plain).abs().max() > 1e-2


def test_a_fresh_controlnet_changes_nothing() -> None:
    unet, _ = random_pair(unet_params("tiny/v1-inference.yaml"), seed=5)
    net = ControlNet(**TINY_CONTROLNET)  # zero convs are zero-initialised, as in the paper
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context, control=net(x, torch.rand(1, 3, 64, 64), t, context)),
                           unet(x, t, context))


@pytest.fixture(scope="module")
def tiny_net() -> ControlNet:
    net = ControlNet(**TINY_CONTROLNET)
    randomise(net, seed=7)
    return net


def write(path: Path, tensors: dict) -> Path:
    save_weights(tensors, path)
    return path


def loaded(path: Path) -> ControlNet:
    with torch.device("meta"):
        net = ControlNet(**TINY_CONTROLNET)
    load_controlnet_weights(net, path)
    return net


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_files_load_with_or_without_the_prefix_and_beside_an_sd_model(tmp_path, tiny_net, suffix) -> None:
    state = tiny_net.state_dict()
    prefixed = write(tmp_path / f"control{suffix}", {PREFIX + k: v for k, v in state.items()})
    bare = write(tmp_path / f"bare{suffix}", dict(state))
    sd = {**{PREFIX + k: v for k, v in state.items()}, "model.diffusion_model.out.2.bias": torch.zeros(4)}
    whole = write(tmp_path / f"whole{suffix}", sd)
    for path in (prefixed, bare, whole):
        got = loaded(path).state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items()), path.name
    assert set(read_controlnet(whole)) == set(state)


def test_missing_parts_wrong_shapes_and_other_files_are_clear_errors(tmp_path, tiny_net) -> None:
    state = {PREFIX + k: v for k, v in tiny_net.state_dict().items()}
    no_zero_convs = write(tmp_path / "partial.safetensors", {k: v for k, v in state.items() if "zero_convs" not in k})
    with pytest.raises(CheckpointError, match="lacks .* zero_convs"):
        loaded(no_zero_convs)
    with torch.device("meta"):
        wider = ControlNet(**{**TINY_CONTROLNET, "model_channels": 64})
    with pytest.raises(CheckpointError, match="does not fit this model's UNet"):
        load_controlnet_weights(wider, write(tmp_path / "tiny.safetensors", state))
    sd2 = dict(state)
    key = PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd2[key] = torch.zeros(sd2[key].shape[0], 1024)
    with pytest.raises(CheckpointError, match="Stable Diffusion 2 .context 1024"):
        read_controlnet(write(tmp_path / "sd21.safetensors", sd2))
    diffusers_format = write(tmp_path / "diffusion_pytorch_model.safetensors",
                             {"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="diffusers-format ControlNet"):
        read_controlnet(diffusers_format)
    lora = write(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(CheckpointError, match="not a ControlNet file"):
        read_controlnet(lora)
    (tmp_path / "pickle.pth").write_bytes(b"\x80\x02c__builtin__\neval\nq\x00.")
    with pytest.raises(CheckpointError, match="refused|not a checkpoint|not readable"):
        read_controlnet(tmp_path / "pickle.pth")
