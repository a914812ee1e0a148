"""LoRA: the kohya name map at full size, peft injection, the file, scale, merge, and parity with diffusers."""
import copy
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, read_lora, save_lora, save_weights
from ldm.lora.files import apply_lora_files
from ldm.lora.layers import (base_state_dict, inject_lora, load_lora_tensors, lora_layers, lora_tensors, merge_lora,
                             set_lora_scale)
from ldm.lora.names import LoraNames
from ldm.modules.attention import SpatialTransformer
from ldm.util import UserError, instantiate_from_config
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import FULL_CONFIG, REPO, TINY_CONFIG
from tests.modules.test_unet import diffusers_twin

LORA_SPEC = REPO / "tests" / "fixtures" / "sd15-lora-kohya-modules.tsv"  # a copy of the project's shared spec
TINY_UNET = OmegaConf.load(TINY_CONFIG).model.params.unet_config.params
NAMES = LoraNames.from_unet_config(TINY_UNET)
# What a kohya file names, by the spec's rules, in diffusers' UNet and in transformers' CLIPTextModel.
DIFFUSERS_TARGET = re.compile(r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\."
                              r"(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")
CLIP_TARGET = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def describe(module: torch.nn.Module) -> tuple[str, int, int]:
    """(type, in, out) as the spec's columns have them."""
    if isinstance(module, torch.nn.Conv2d):
        return "Conv2d", module.in_channels, module.out_channels
    return type(module).__name__, module.in_features, module.out_features


def test_full_size_names_equal_the_spec_on_meta() -> None:
    spec = {}
    for line in LORA_SPEC.read_text().splitlines():
        name, kind, n_in, n_out = line.split("\t")
        spec[name] = (kind, int(n_in), int(n_out))
    config = OmegaConf.load(FULL_CONFIG)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    names = LoraNames.from_unet_config(config.model.params.unet_config.params)
    modules = dict(model.named_modules())
    transformers = {n[len("model.diffusion_model."):] for n, m in modules.items() if isinstance(m, SpatialTransformer)}
    assert set(names.blocks) == transformers, "the block map from the config misses or invents transformers"
    targets = names.targets(modules, "transformer", text_encoder=True)
    got = {names.kohya(n): describe(modules[n]) for n in targets}
    assert len(targets) == len(got) == 264
    assert sorted(set(spec) - set(got)) == [] and sorted(set(got) - set(spec)) == []
    assert {n: got[n] for n in spec if got[n] != spec[n]} == {}, "type or shape differs"
    assert sum(n.startswith("lora_unet_") for n in got) == 192
    assert len(names.targets(modules, "attention")) == 16 * 8
    assert len(names.targets(modules, "transformer")) == 192


def tiny(seed: int = 0):
    return randomise_zero_init(build_tiny_model(seed), seed).eval()


def randomise_lora(model, seed: int = 1) -> None:
    """Give the (zero-initialised) up matrices values, so that the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            up = layer.lora_B["default"].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.3)


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's eps and the text encoder's hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 917])
    context = torch.randn(2, 7, TINY_UNET.context_dim, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        return model.apply_model(x, t, context), model.cond_stage_model.transformer(ids)


def assert_outputs_close(a, b, atol: float) -> None:
    for mine, theirs in zip(a, b):
        assert mine.std() > 0.1, "outputs too small for the tolerance to mean anything"
        err = (mine - theirs).abs().max().item()
        assert err <= atol, f"max abs error {err:.3e}"


def test_fresh_lora_is_the_identity_and_only_it_trains() -> None:
    model, base = tiny(), tiny()
    before = base.state_dict()
    names = inject_lora(model, NAMES, rank=4, text_encoder=True)
    assert len(names) == len(lora_layers(model)) == 7 * 12 + 2 * 6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for a, b in zip(outputs(model), outputs(base)):
        assert torch.equal(a, b)
    state = base_state_dict(model)
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)


def test_scale_zero_gives_the_base_output_exactly() -> None:
    model, base = tiny(), tiny()
    inject_lora(model, NAMES, rank=4, alpha=8, targets="attention", text_encoder=True)
    randomise_lora(model)
    changed = outputs(model)
    set_lora_scale(model, 0.0)
    for a, b, c in zip(outputs(model), outputs(base), changed):
        assert torch.equal(a, b) and not torch.allclose(b, c)


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_save_read_load_round_trip(tmp_path, dtype) -> None:
    model = tiny()
    inject_lora(model, NAMES, rank=4, alpha=2, text_encoder=True)
    randomise_lora(model)
    tensors = lora_tensors(model, NAMES)
    down = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert tensors[down].shape == (4, 32, 1, 1) and tensors[down.replace("proj_in", "proj_out")].ndim == 4
    assert tensors["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight"].shape == (64, 4)
    path = tmp_path / "subject.safetensors"
    save_lora(tensors, path, base_hash="ab" * 32, metadata={"ss_output_name": "subject"}, dtype=dtype)
    read, metadata = read_lora(path)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_new_sd_model_hash"] == "ab" * 32
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_output_name"]) == \
        ("4", "2.0", "subject")
    assert read.keys() == tensors.keys() and read[down].dtype == (dtype or torch.float32)
    other = tiny()
    inject_lora(other, NAMES, rank=4, text_encoder=True)  # alpha 4 here; the file's 2 wins
    report = load_lora_tensors(other, read, NAMES, source=path.name)
    assert (report.unet, report.text, report.skipped) == (84, 12, {})
    expected = outputs(model)
    if dtype is None:
        assert all(torch.equal(t, lora_tensors(other, NAMES)[k]) for k, t in tensors.items())
        assert all(torch.equal(a, b) for a, b in zip(outputs(other), expected))
    else:
        assert_outputs_close(outputs(other), expected, atol=1e-2)


def test_load_refuses_another_rank_or_targets() -> None:
    model = tiny()
    inject_lora(model, NAMES, rank=4)
    tensors = lora_tensors(model, NAMES)
    other = tiny()
    inject_lora(other, NAMES, rank=8)
    with pytest.raises(CheckpointError, match="has rank 4, the model's LoRA rank 8: use --rank 4"):
        load_lora_tensors(other, tensors, NAMES)
    wider = tiny()
    inject_lora(wider, NAMES, rank=4, text_encoder=True)
    with pytest.raises(CheckpointError, match="no LoRA for 12 of the 96 injected modules .*lora_te_"):
        load_lora_tensors(wider, tensors, NAMES)


def test_bad_options_are_refused() -> None:
    with pytest.raises(UserError, match="LoRA rank 0"):
        inject_lora(tiny(), NAMES, rank=0)
    with pytest.raises(ValueError, match="use one of attention, transformer"):
        inject_lora(tiny(), NAMES, targets="all")


def test_a_rank_above_the_narrowest_target_is_refused_before_any_layer_is_built() -> None:
    model = tiny()
    before = sum(p.numel() for p in model.parameters())
    with pytest.raises(UserError, match=r"LoRA rank 100000 \(--rank\) is above the width of the narrowest target "
                                        r"module, .* use at most \d+ ") as refused:
        inject_lora(model, NAMES, rank=100000, text_encoder=True)
    assert sum(p.numel() for p in model.parameters()) == before
    widest = int(str(refused.value).split("use at most ")[1].split()[0])
    assert inject_lora(tiny(), NAMES, rank=widest, text_encoder=True)  # the highest rank that adds capacity
    with pytest.raises(UserError, match=f"LoRA rank {widest + 1} "):
        inject_lora(tiny(), NAMES, rank=widest + 1, text_encoder=True)


def test_merge_gives_the_applied_output(tmp_path) -> None:
    model = tiny()
    inject_lora(model, NAMES, rank=4, alpha=3, text_encoder=True)
    randomise_lora(model)
    set_lora_scale(model, 0.7)
    tensors = lora_tensors(model, NAMES)
    merged = tiny()
    report = merge_lora(merged.state_dict(), tensors, NAMES, scale=0.7, source="a.safetensors")
    assert (report.unet, report.text) == (84, 12)
    assert_outputs_close(outputs(merged), outputs(model), atol=1e-5)
    # A checkpoint's tensors (fp16, as files are usually stored) merge alike, two files one after the other.
    base = tiny().state_dict()
    state = {k: v.half() for k, v in base.items()}
    other = {k: v.flip(0) if k.endswith("up.weight") else v for k, v in tensors.items()}
    merge_lora(state, tensors, NAMES, scale=0.7)
    merge_lora(state, other, NAMES, scale=-0.5)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    delta = [t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"] * 3 / 4 for t in (tensors, other)]
    expected = base[key] + 0.7 * delta[0] - 0.5 * delta[1]
    assert state[key].dtype == torch.float16
    torch.testing.assert_close(state[key].float(), expected, atol=2e-3, rtol=1e-3)


def kohya_file_from_diffusers(unet, text_model, alpha: float | None = None, rank: int = 4) -> dict:
    """A kohya-format LoRA named by the spec's rules from diffusers' and transformers' module paths, with random
    weights; alpha `None` gives each module its own."""
    g, tensors = torch.Generator().manual_seed(3), {}
    modules = [("lora_unet_" + n, m) for n, m in unet.named_modules() if DIFFUSERS_TARGET.fullmatch(n)]
    modules += [("lora_te_text_model_" + n, m) for n, m in text_model.named_modules() if CLIP_TARGET.fullmatch(n)]
    for path, module in modules:
        kind, n_in, n_out = describe(module)
        name, tail = path.replace(".", "_"), (1, 1) if kind == "Conv2d" else ()
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, n_in, *tail, generator=g) / n_in ** 0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(n_out, rank, *tail, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(alpha or float(torch.randint(1, 9, (), generator=g)))
    return tensors


def diffusers_pipeline(model):
    """StableDiffusionPipeline on the same base weights (the UNet through diffusers' single-file converter)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the parity test")
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    unet = diffusers_twin(OmegaConf.to_container(TINY_UNET)).eval()
    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.diffusion_model.")}
    unet.load_state_dict(convert(state, dict(unet.config)), strict=True)
    return diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(model.cond_stage_model.transformer.text_model),
        tokenizer=model.cond_stage_model.tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_kohya_file_gives_diffusers_output(tmp_path) -> None:
    model = tiny()
    pipe = diffusers_pipeline(model)
    # One alpha (not the rank): diffusers 0.42 mis-keys per-module alphas (its alpha_pattern warns and drops them).
    tensors = kohya_file_from_diffusers(pipe.unet, pipe.text_encoder, alpha=2.0)
    path = tmp_path / "kohya.safetensors"
    save_weights(tensors, path, metadata={"ss_network_module": "networks.lora"})
    tensors = read_lora(path)[0]
    base = outputs(model)
    pipe.load_lora_weights(dict(tensors))
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 917])
    context = torch.randn(2, 7, TINY_UNET.context_dim, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(ids).last_hidden_state
    assert not torch.allclose(theirs[0], base[0], atol=1e-2), "diffusers applied no LoRA to the UNet"
    assert not torch.allclose(theirs[1], base[1], atol=1e-2), "diffusers applied no LoRA to the text encoder"
    report = merge_lora(model.state_dict(), tensors, NAMES)
    assert (report.unet, report.text, report.skipped) == (84, 12, {})
    assert_outputs_close(outputs(model), theirs, atol=1e-4)
    injected = tiny()
    inject_lora(injected, NAMES, rank=4, text_encoder=True)
    load_lora_tensors(injected, tensors, NAMES)
    assert_outputs_close(outputs(injected), theirs, atol=1e-4)


def test_per_module_alpha_and_the_compvis_naming_style() -> None:
    model = tiny()
    pipe = diffusers_pipeline(model)
    tensors = kohya_file_from_diffusers(pipe.unet, pipe.text_encoder)
    lookup = NAMES.lookup(n for n, _ in model.named_modules())
    compvis = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        ours = lookup[name]
        if ours.startswith("model.diffusion_model."):
            name = "lora_unet_" + ours[len("model.diffusion_model."):].replace(".", "_")
        else:
            name = name.replace("lora_te_text_model_", "lora_te_")  # written by tools on transformers 5
        compvis[f"{name}.{suffix}"] = value
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha" in compvis
    assert "lora_unet_output_blocks_3_1_proj_out.lora_up.weight" in compvis
    a, b = tiny(), tiny()
    merge_lora(a.state_dict(), tensors, NAMES)
    report = merge_lora(b.state_dict(), compvis, NAMES)
    assert (report.unet, report.text) == (84, 12)
    assert all(torch.equal(x, y) for x, y in zip(outputs(a), outputs(b)))
    key = "model.diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.2.weight"
    name = "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2"
    rank, alpha = 4, float(tensors[f"{name}.alpha"])
    delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] * alpha / rank
    torch.testing.assert_close(a.state_dict()[key], model.state_dict()[key] + delta)


def test_modules_we_do_not_apply_are_counted(caplog) -> None:
    g = torch.Generator().manual_seed(0)
    model = tiny()
    inject_lora(model, NAMES, rank=2)
    tensors = lora_tensors(model, NAMES)
    for locon in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv"):
        tensors[f"{locon}.lora_down.weight"] = torch.randn(2, 32, 3, 3, generator=g)  # merge applies a ResBlock's
        tensors[f"{locon}.lora_up.weight"] = torch.randn(32, 2, 1, 1, generator=g)
    resnet = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"
    tensors.update({f"{resnet}.lora_down.weight": torch.ones(2, 128), f"{resnet}.lora_up.weight": torch.ones(32, 2)})
    loha = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # a module we have, in a kind we do not apply
    tensors.update({f"{loha}.hada_t1": torch.ones(2, 2, 3, 3), f"{loha}.hada_w1_a": torch.ones(2, 2)})
    oft = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    tensors[f"{oft}.oft_blocks"] = torch.ones(2, 2, 2)
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lokr_w1"] = torch.ones(2, 2)
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lokr_w2"] = torch.ones(2, 2)
    with caplog.at_level(logging.WARNING, logger="ldm.lora.layers"):
        report = merge_lora(tiny().state_dict(), tensors, NAMES, source="mixed.safetensors")
    assert (report.unet, report.text) == (85, 0)
    assert report.skipped == {"LoCon convs (3x3)": 1, "LoHa Tucker (hada_t1)": 1, "OFT (oft_)": 1,
                              "LoRA on modules outside the UNet's transformers and the text encoder": 1,
                              "LoKr on modules outside the UNet's transformers and the text encoder": 1}
    assert "not applied: 1 LoCon convs (3x3), 1 LoHa Tucker (hada_t1)" in caplog.text
    assert load_lora_tensors(model, tensors, NAMES).skipped == {**report.skipped, "LoCon convs (3x3)": 2}
    sdxl = {k: v for k, v in tensors.items() if k.startswith("lora_te2_")}
    with pytest.raises(CheckpointError, match="sdxl.safetensors changes no module of this model .*1 LoKr on"):
        merge_lora(tiny().state_dict(), sdxl, NAMES, source="sdxl.safetensors")


def test_read_lora_refuses_what_is_not_a_lora_file(tmp_path) -> None:
    full = tmp_path / "model.safetensors"
    save_weights(build_tiny_model().state_dict(), full)
    with pytest.raises(CheckpointError, match="is a full SD v1 checkpoint, not a LoRA file"):
        read_lora(full)
    peft_style = tmp_path / "pytorch_lora_weights.safetensors"
    save_weights({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 2)}, peft_style)
    with pytest.raises(CheckpointError, match="a LoRA in another format .* reads kohya-format files"):
        read_lora(peft_style)
    run = tmp_path / "my run" / "checkpoints"
    run.mkdir(parents=True)
    model = tiny()
    inject_lora(model, NAMES, rank=4)
    save_weights({k: v for k, v in model.state_dict().items() if ".lora_" in k}, run / "last.ckpt")
    with pytest.raises(CheckpointError, match=f"last.ckpt is a LoRA run's resumable checkpoint, not its LoRA file: "
                                              f"pass {re.escape(str(run / 'last.safetensors'))}, written beside it"):
        read_lora(run / "last.ckpt")
    other = tmp_path / "other.safetensors"
    save_weights({"weight": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="is not a LoRA file: none of its 1 tensors"):
        read_lora(other)
    broken = tmp_path / "nan.safetensors"
    save_weights({"lora_te_x.lora_up.weight": torch.tensor([float("nan")])}, broken)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        read_lora(broken)
    with pytest.raises(CheckpointError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="written as .safetensors"):
        save_lora({"lora_te_x.alpha": torch.tensor(1.0)}, tmp_path / "a.ckpt", base_hash="0")


def test_bf16_file_merges(tmp_path) -> None:
    model = tiny()
    inject_lora(model, NAMES, rank=4)
    randomise_lora(model)
    path = tmp_path / "bf16.safetensors"
    save_lora(lora_tensors(model, NAMES), path, base_hash="0", dtype=torch.bfloat16)
    tensors, _ = read_lora(path)
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].dtype == torch.bfloat16
    merged = tiny()
    merge_lora(merged.state_dict(), tensors, NAMES)
    assert_outputs_close(outputs(merged)[:1], outputs(model)[:1], atol=3e-2)


def tiny_with_clip_skip(clip_skip: int):
    """The tiny model (2 text encoder layers) conditioned on its text encoder's `clip_skip`-th layer from the end."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.cond_stage_config.params.clip_skip = clip_skip
    torch.manual_seed(0)
    return randomise_zero_init(instantiate_from_config(config.model)).eval(), config


def test_clip_skip_leaves_the_skipped_text_layers_without_lora_and_the_file_samples(tmp_path) -> None:
    model, config = tiny_with_clip_skip(2)
    names = inject_lora(model, NAMES, rank=4, text_encoder=True)
    text = [n for n in names if n.startswith("cond_stage_model.")]
    assert len(text) == 6 and all(".layers.0." in n for n in text), "LoRA on the layer that clip_skip 2 skips"
    randomise_lora(model)
    batch = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "txt": ["a photo of sks dog"] * 2}
    model.shared_step(batch)["loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert dead == [], "LoRA weights that the loss never reaches (DDP waits for their gradients)"
    path = tmp_path / "clip_skip.safetensors"
    save_lora(lora_tensors(model, NAMES), path, base_hash="0" * 64)
    assert not [k for k in read_lora(path)[0] if "encoder_layers_1_" in k]
    plain, _ = tiny_with_clip_skip(2)
    apply_lora_files(plain, config.model, [str(path)])  # what txt2img --lora does
    with torch.no_grad():
        merged, injected = (m.get_learned_conditioning(["a photo of sks dog"]) for m in (plain, model))
    assert (merged - injected).abs().max() <= 1e-5
