"""The LyCORIS kinds beside LoRA (DoRA, LoHa, LoKr): the file we write, merged by merge_lora (what --lora and
scripts/merge_lora.py do), gives the output and the image that the LyCORIS library (lycoris-lora, the independent
reference) gives on the same base and file; the step file and last.ckpt round-trip; wrong files and options are
one-line errors."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, read_lora, save_lora
from ldm.inference.sampling import sample_images
from ldm.lora.files import apply_lora_files
from ldm.lora.layers import (LoraOptions, base_state_dict, inject_lora, is_lora_key, load_lora_tensors, lora_tensors,
                             merge_lora)
from ldm.util import UserError, instantiate_from_config
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import TINY_CONFIG
from tests.lora.test_lora import NAMES, assert_outputs_close, outputs, tiny

lycoris_modules = pytest.importorskip("lycoris.modules", reason="lycoris-lora is the reference of these tests")
MODEL_CONFIG = {"params": {"unet_config": {"params": OmegaConf.to_container(OmegaConf.load(TINY_CONFIG)
                                                                            .model.params.unet_config.params)}}}
# (network, rank, alpha): on the tiny model LoKr rank 4 gives some modules full w1 and w2 (scale 1 whatever the
# alpha) and the wider ones a decomposed w2 (scale alpha / r); rank 2 decomposes every w2.
KINDS = [("lora", 4, 2.0), ("dora", 4, 2.0), ("loha", 4, 2.0), ("lokr", 4, 2.0), ("lokr", 2, 3.0)]
FILE_KEYS = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
             "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
             "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}


def randomise(model, seed: int = 1) -> None:
    """Random adapter weights (DoRA's magnitude: the base norm times 1 +- 20 %), so that every part counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "magnitude" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def kind_files(tmp_path_factory) -> dict:
    """For each of KINDS: a random network of that kind on the UNet and the text encoder, as the file we write
    and the outputs of the injected (peft) model, by `network + rank`."""
    root, files = tmp_path_factory.mktemp("kinds"), {}
    for network, rank, alpha in KINDS:
        model = tiny()
        inject_lora(model, NAMES, rank=rank, alpha=alpha, text_encoder=True, network=network)
        randomise(model)
        path = root / f"{network}{rank}.safetensors"
        save_lora(lora_tensors(model, NAMES), path, base_hash="0" * 64)
        files[f"{network}{rank}"] = path, outputs(model)
    return files


def with_lycoris(model, tensors, scale: float = 1.0) -> list:
    """Apply a file to `model` with the LyCORIS library's own modules (its forward wraps each of our modules)."""
    modules, applied = dict(model.named_modules()), []
    lookup = NAMES.lookup(modules)
    for name in sorted({key.split(".")[0] for key in tensors}):
        kind, params = lycoris_modules.get_module(tensors, name)
        module = lycoris_modules.make_module(kind, params, name, modules[lookup[name]])
        module.multiplier = scale
        module.apply_to()
        applied.append(module)
    return applied


@pytest.mark.parametrize("network, rank, alpha", KINDS, ids=[f"{n}{r}" for n, r, _ in KINDS])
def test_our_file_merged_gives_what_lycoris_gives(kind_files, network, rank, alpha) -> None:
    path, trained = kind_files[f"{network}{rank}"]
    tensors, _ = read_lora(path)
    suffixes = {key.partition(".")[2] for key in tensors}
    if network == "lokr":
        assert "lokr_w1" in suffixes and "lokr_w2_a" in suffixes and ("lokr_w2" in suffixes) == (rank == 4)
    else:
        assert suffixes == FILE_KEYS[network]
    if network == "dora":
        assert tensors["lora_unet_mid_block_attentions_0_proj_in.dora_scale"].shape == (64, 1, 1, 1)
        assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"].shape == (64, 1)
    scale = 1.0 if network == "dora" else 0.7  # DoRA at other scales: test_dora_scale_interpolates_the_weights
    merged = tiny()
    report = merge_lora(merged.state_dict(), tensors, NAMES, scale=scale)
    assert (report.unet, report.text, report.skipped) == (84, 12, {})
    assert report.kinds == {{"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[network]: 96}
    reference = tiny()
    applied = with_lycoris(reference, tensors, scale)
    assert len(applied) == 96
    theirs = outputs(reference)
    assert not torch.allclose(theirs[0], outputs(tiny())[0], atol=1e-2), "LyCORIS applied nothing to the UNet"
    assert_outputs_close(outputs(merged), theirs, atol=1e-4)
    if scale == 1.0:
        assert_outputs_close(trained, theirs, atol=1e-4)  # what peft trained is what the file gives


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_the_image_through_our_sampler_is_lycoris_image(kind_files, network) -> None:
    path, _ = kind_files[f"{network}4"]
    ours, reference = tiny(), tiny()
    plain = image(ours)
    apply_lora_files(ours, MODEL_CONFIG, [str(path)])  # what txt2img --lora does
    with_lycoris(reference, read_lora(path)[0])
    mine, theirs = image(ours), image(reference)
    assert np.abs(mine - theirs).max() <= 2
    assert np.abs(mine - plain).mean() > 1, "the network does not change the image"


def image(model) -> np.ndarray:
    """One 8-bit sample of the tiny model through our sampler (DDIM, 3 steps, guidance 5, seed 0)."""
    return np.asarray(sample_images(model, "a photo of sks dog", [0], steps=3, scale=5.0)[0], dtype=np.int16)


def test_dora_scale_interpolates_the_weights(kind_files) -> None:
    """DoRA at a sampling scale s is W + s (W' - W), as ComfyUI and A1111 apply it: s = 0 is the base exactly."""
    tensors, _ = read_lora(kind_files["dora4"][0])
    base = tiny().state_dict()
    states = {}
    for scale in (0.0, 0.5, 1.0):
        states[scale] = {k: v.clone() for k, v in base.items()}
        merge_lora(states[scale], tensors, NAMES, scale=scale)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert all(torch.equal(states[0.0][k], base[k]) for k in base)
    torch.testing.assert_close(states[0.5][key], (base[key] + states[1.0][key]) / 2)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] * 2.0 / 4
    merged = base[key] + delta
    expected = tensors[f"{name}.dora_scale"] * merged / merged.norm(dim=1, keepdim=True)
    torch.testing.assert_close(states[1.0][key], expected)


def test_a_dora_file_normed_per_input_column_merges_as_a1111_reads_it() -> None:
    """Older LyCORIS wrote dora_scale as [1, in] (the norm per input column), which A1111 reads; we read both."""
    g = torch.Generator().manual_seed(0)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    tensors = {f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{name}.lora_up.weight": torch.randn(64, 2, generator=g), f"{name}.alpha": torch.tensor(1.0),
               f"{name}.dora_scale": torch.rand(1, 32, generator=g) + 0.5}
    base = tiny().state_dict()
    state = {k: v.clone() for k, v in base.items()}
    assert merge_lora(state, tensors, NAMES).kinds == {"DoRA": 1}
    merged = base[key] + tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] / 2
    torch.testing.assert_close(state[key], tensors[f"{name}.dora_scale"] * merged / merged.norm(dim=0, keepdim=True))
    tensors[f"{name}.dora_scale"] = torch.ones(3, 1)
    with pytest.raises(CheckpointError, match=r"has a dora_scale \(3, 1\) for a \(64, 32\) weight; expected \[64, 1\]"):
        merge_lora(state, tensors, NAMES)


def lora_model(network: str, rank: int = 4, factor: int = -1):
    """The tiny LatentDiffusion of a run of this network kind, injected after its base weights."""
    model = randomise_zero_init(build_tiny_model(cond_stage_trainable=False, lora={
        "rank": rank, "network": network, "factor": factor, "text_encoder": True}))
    model.inject_lora(model.unet_params)
    return model


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_step_file_metadata_and_resume_state_of_each_kind(tmp_path, network) -> None:
    model = lora_model(network)
    randomise(model)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(is_lora_key(name) for name in trained)
    assert list(base_state_dict(model)) == list(tiny().state_dict())  # every adapter weight left out
    model.save_lora_file(tmp_path / "step_2.safetensors")
    tensors, metadata = read_lora(tmp_path / "step_2.safetensors")
    args = json.loads(metadata["ss_network_args"])
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert args == {"dora": {"algo": "lora", "dora_wd": "True"}, "loha": {"algo": "loha"},
                    "lokr": {"algo": "lokr", "factor": "-1"}}[network]
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    resumed = lora_model(network)
    resumed.load_lora_file(tmp_path / "step_2.safetensors")  # --resume_weights_only
    assert all(torch.equal(a, b) for a, b in zip(outputs(resumed), outputs(model)))
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(trained)
    resumed.on_load_checkpoint(checkpoint)
    plain = lora_model("lora")
    with pytest.raises(CheckpointError, match=f"the checkpoint trains .*, but the config LoRA; resume it with "
                                              f"--network {network}"):
        plain.on_load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=f"step_2.safetensors: lora_\\w+ is \\w+, but the model trains LoRA: "
                                              f"use --network {network}"):
        plain.load_lora_file(tmp_path / "step_2.safetensors")


def test_a_file_for_another_model_or_rank_is_one_clear_error(tmp_path) -> None:
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.model_channels = 64  # the same modules, twice as wide
    torch.manual_seed(0)
    wide = instantiate_from_config(config.model)
    inject_lora(wide, NAMES, rank=2, network="lokr")
    with pytest.raises(CheckpointError, match=r"wide.safetensors: .* \(LoKr\) changes a \(64, 64\) weight but the "
                                              r"model's is \(32, 32, 1, 1\); is it for another model"):
        merge_lora(tiny().state_dict(), lora_tensors(wide, NAMES), NAMES, source="wide.safetensors")
    balanced, by_four = tiny(), tiny()
    inject_lora(balanced, NAMES, rank=4, network="lokr")
    inject_lora(by_four, NAMES, rank=4, network="lokr", factor=4)
    with pytest.raises(CheckpointError, match=r"a.safetensors: lora_\w+ holds .* but the model's LoKr layer needs .*; "
                                              r"use the --network, --rank and --factor it was trained with"):
        load_lora_tensors(by_four, lora_tensors(balanced, NAMES), NAMES, source="a.safetensors")


@pytest.mark.parametrize("options, message", [
    ({"network": "lycoris"}, "network 'lycoris' (--network): use one of lora, dora, loha, lokr"),
    ({"network": "loha", "factor": 4}, "--factor 4 is LoKr's (how the Kronecker product splits each weight); it does "
                                       "not apply to --network loha"),
    ({"network": "lokr", "factor": 0}, "LoKr factor 0 (--factor): expected -1"),
])
def test_bad_network_options_are_refused(options, message) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoraOptions.from_config({"rank": 4, **options})


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_a_rank_above_the_narrowest_target_is_refused_for_every_kind(network) -> None:
    with pytest.raises(UserError, match="LoRA rank 100000 \\(--rank\\) is above the width of the narrowest target"):
        inject_lora(tiny(), NAMES, rank=100000, network=network)


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_a_fresh_network_is_the_identity(network) -> None:
    model = tiny()
    inject_lora(model, NAMES, rank=2, network=network, text_encoder=True)
    for mine, base in zip(outputs(model), outputs(tiny())):
        torch.testing.assert_close(mine, base, atol=1e-5, rtol=0)
