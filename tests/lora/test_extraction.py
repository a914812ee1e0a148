"""LoRA extraction and resizing (ldm/lora/extraction.py, scripts/extract_lora.py): exact on a difference of rank at
most the LoRA's, Eckart-Young optimal below it, per-module ranks by energy, LoCon 3x3 convs that merge_lora applies,
the ResBlock names as diffusers has them, one `error:` line for each bad input, and the command on tiny files."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_lora, read_state_dict, save_lora, save_weights
from ldm.lora.extraction import RankRule, extract_lora, resize_lora
from ldm.lora.layers import merge_lora
from ldm.lora.names import UNET, LoraNames
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.cli.test_cli import error_lines
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import TINY_CONFIG, load_script
from tests.modules.test_unet import SECOND_CONFIG, diffusers_twin, unet_params

NAMES = LoraNames.from_unet_config(OmegaConf.load(TINY_CONFIG).model.params.unet_config.params)
script = load_script("extract_lora")


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return randomise_zero_init(build_tiny_model(0)).state_dict()  # no zero weight: each difference is relative


def modules_of(state, conv: bool = True) -> list[str]:
    """Every module a LoRA can hold in the tiny model: transformer, text encoder and (with `conv`) ResBlock convs."""
    weights = [key.removesuffix(".weight") for key in state if key.endswith(".weight")]
    return NAMES.targets(weights, "transformer", text_encoder=True) + (NAMES.resnet_convs(weights) if conv else [])


def fine_tune(base, modules, rank, seed: int = 1, size: float = 0.02) -> dict[str, torch.Tensor]:
    """`base` with a random difference of rank `rank(i)` (None: full rank) added to the weight of each of `modules`."""
    g, tuned = torch.Generator().manual_seed(seed), {key: value.clone() for key, value in base.items()}
    for i, name in enumerate(modules):
        weight = tuned[f"{name}.weight"]
        out, fan_in, k = weight.shape[0], weight[0].numel(), rank(i)
        delta = (torch.randn(out, fan_in, generator=g) if k is None else
                 torch.randn(out, k, generator=g) @ torch.randn(k, fan_in, generator=g))
        weight += (delta * size / delta.norm() * weight.norm()).reshape(weight.shape)
    return tuned


def merged(base, tensors) -> dict[str, torch.Tensor]:
    """A copy of `base` with the LoRA tensors folded in by merge_lora (as sampling does)."""
    state = {key: value.clone() for key, value in base.items()}
    merge_lora(state, tensors, NAMES, source="extracted")
    return state


def test_resnet_conv_names_are_diffusers_paths() -> None:
    convert = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    for params in (unet_params("tiny/v1-inference.yaml"), SECOND_CONFIG):
        state = {UNET + k: v for k, v in UNetModel(**params).state_dict().items()}
        theirs = {v.data_ptr(): k for k, v in convert(state, dict(diffusers_twin(params).config)).items()}
        names = LoraNames(params["channel_mult"], params["num_res_blocks"], params["attention_resolutions"])
        convs = names.resnet_convs(key.removesuffix(".weight") for key in state)
        levels, blocks = len(params["channel_mult"]), params["num_res_blocks"]
        assert len(convs) == 2 * (levels * blocks + 2 + levels * (blocks + 1))  # conv1 and conv2 of every ResBlock
        assert {names.kohya(name) for name in convs} == {
            "lora_unet_" + theirs[state[f"{name}.weight"].data_ptr()].removesuffix(".weight").replace(".", "_")
            for name in convs}
    assert names.kohya(UNET + "input_blocks.1.0.in_layers.2") == "lora_unet_down_blocks_0_resnets_0_conv1"


def test_a_low_rank_difference_is_extracted_exactly_and_merges_back(base) -> None:
    modules = modules_of(base)
    tuned = fine_tune(base, modules, rank=lambda i: 1 + i % 3)
    extraction = extract_lora(base, tuned, NAMES, modules, RankRule(rank=4))
    assert len(extraction.tensors) == 3 * len(modules) == 3 * (84 + 12 + 16)
    conv = "lora_unet_up_blocks_1_resnets_1_conv2"
    assert extraction.tensors[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert extraction.tensors[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    state = merged(base, extraction.tensors)
    assert all(torch.allclose(state[key], tuned[key], atol=2e-6) for key in base)
    assert max(float(report.error / report.total) for report in extraction.groups.values()) < 1e-10
    assert sorted(extraction.groups) == ["UNet input blocks", "UNet middle block", "UNet output blocks", "text encoder"]


def test_a_full_rank_difference_keeps_the_eckart_young_optimum(base) -> None:
    modules = modules_of(base)
    tuned = fine_tune(base, modules, rank=lambda i: None)
    extraction = extract_lora(base, tuned, NAMES, modules, RankRule(rank=3))
    state = merged(base, extraction.tensors)
    discarded = total = 0.0
    for name in modules:
        delta = (tuned[f"{name}.weight"] - base[f"{name}.weight"]).flatten(1)
        sigma = torch.linalg.svdvals(delta.double())
        optimum = float(sigma[3:].square().sum().sqrt())
        error = float((state[f"{name}.weight"] - tuned[f"{name}.weight"]).double().norm())
        assert error == pytest.approx(optimum, rel=1e-4), name
        discarded, total = discarded + optimum ** 2, total + float(sigma.square().sum())
    reports = extraction.groups.values()
    assert sum(r.error for r in reports) / sum(r.total for r in reports) == pytest.approx(discarded / total, rel=1e-4)
    kept = sum(r.kept for r in reports) / sum(r.total for r in reports)
    assert kept == pytest.approx(1 - discarded / total, rel=1e-4)


def test_energy_keeps_the_smallest_rank_that_holds_the_fraction() -> None:
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: 64.3 %, 92.9 %, 100 %
    assert [RankRule(energy=e).choose(sigma) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert RankRule(energy=1.0, max_rank=2).choose(sigma) == 2
    assert RankRule(rank=8).choose(sigma) == 4


def test_energy_gives_per_module_ranks_that_merge_lora_loads(base, tmp_path) -> None:
    modules = modules_of(base)
    tuned = fine_tune(base, modules, rank=lambda i: 1 + i % 5)
    rule = RankRule(energy=1 - 1e-6, max_rank=4)  # energy 1 keeps the float noise past the rank too
    extraction = extract_lora(base, tuned, NAMES, modules, rule)
    ranks = [v.shape[0] for k, v in extraction.tensors.items() if k.endswith("lora_down.weight")]
    assert sorted(set(ranks)) == [1, 2, 3, 4]  # rank 5 capped at 4
    path = tmp_path / "dynamic.safetensors"
    save_lora(extraction.tensors, path, "", extraction.metadata(rule))
    tensors, metadata = read_lora(path)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    assert json.loads(metadata["ss_network_args"]) == {"dynamic": "energy 0.999999, max rank 4", "conv_dim": "4",
                                                       "conv_alpha": "4.0"}
    state = merged(base, tensors)
    exact = [name for i, name in enumerate(modules) if 1 + i % 5 <= 4]
    assert all(torch.allclose(state[f"{name}.weight"], tuned[f"{name}.weight"], atol=2e-6) for name in exact)


def random_lora(rank: int = 6, alpha: float = 3.0, seed: int = 2) -> dict[str, torch.Tensor]:
    """A kohya LoRA of rank `rank` on two Linears and a LoCon 3x3 conv, alpha != rank."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name, down, up in [("lora_unet_down_blocks_0_attentions_0_proj_in", (rank, 32, 1, 1), (32, rank, 1, 1)),
                           ("lora_te_text_model_encoder_layers_0_mlp_fc1", (rank, 32), (64, rank)),
                           ("lora_unet_mid_block_resnets_1_conv1", (rank, 64, 3, 3), (64, rank, 1, 1))]:
        tensors.update({f"{name}.lora_down.weight": torch.randn(down, generator=g),
                        f"{name}.lora_up.weight": torch.randn(up, generator=g), f"{name}.alpha": torch.tensor(alpha)})
    return tensors


@pytest.mark.parametrize("new_rank", [6, 9])
def test_resize_to_the_old_rank_or_more_is_exact(base, new_rank) -> None:
    tensors = random_lora()
    resized = resize_lora(tensors, RankRule(rank=new_rank))
    assert all(v.shape[0] == 6 for k, v in resized.tensors.items() if k.endswith("lora_down.weight"))
    expected, got = merged(base, tensors), merged(base, resized.tensors)
    assert all(torch.allclose(got[key], expected[key], atol=1e-5) for key in base)


def test_resize_to_a_lower_rank_is_eckart_young_optimal(base) -> None:
    tensors = random_lora()
    resized = resize_lora(tensors, RankRule(rank=2))
    expected, got = merged(base, tensors), merged(base, resized.tensors)
    lookup = NAMES.lookup(key.removesuffix(".weight") for key in base if key.endswith(".weight"))
    for name in {key.split(".")[0] for key in tensors}:
        up, down = tensors[f"{name}.lora_up.weight"].flatten(1), tensors[f"{name}.lora_down.weight"].flatten(1)
        optimum = float(torch.linalg.svdvals((up @ down * 3.0 / 6).double())[2:].square().sum().sqrt())
        key = f"{lookup[name]}.weight"
        assert float((got[key] - expected[key]).double().norm()) == pytest.approx(optimum, rel=1e-4), name
    assert resized.tensors[f"{name}.alpha"] == 2.0


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    """Tiny checkpoint files: the base, a fine-tune of rank <= 3 per module (.ckpt), an unrelated model, and one whose
    cross-attention takes a context of another width."""
    root = tmp_path_factory.mktemp("extract")
    tuned = fine_tune(base, modules_of(base), rank=lambda i: 1 + i % 3)
    other = randomise_zero_init(build_tiny_model(3), seed=3).state_dict()
    g = torch.Generator().manual_seed(4)
    wider = {k: torch.randn(v.shape[0], 48, generator=g) if "attn2.to_k" in k or "attn2.to_v" in k else v
             for k, v in base.items()}
    paths = {"base": root / "base.safetensors", "tuned": root / "tuned.ckpt", "other": root / "other.safetensors",
             "wider": root / "wider.safetensors"}
    for name, state in [("base", base), ("tuned", tuned), ("other", other), ("wider", wider)]:
        save_weights(state, paths[name])
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize("args, expected", [
    (["{tuned}", "--base", "{base}", "--energy", "0"], "error: --energy 0: expected a fraction above 0 and at most 1"),
    (["{tuned}", "--base", "{base}", "--energy", "1.5"], "error: --energy 1.5: expected a fraction above 0"),
    (["{tuned}", "--base", "{base}"], "error: give one of --rank N (the same rank for every module) and --energy E"),
    (["{tuned}", "--base", "{base}", "--rank", "4", "--energy", "0.9"], "error: give one of --rank N"),
    (["{tuned}", "--base", "{base}", "--rank", "4", "--max_rank", "8"], "error: --max_rank caps the ranks"),
    (["{wider}", "--base", "{base}", "--rank", "4"], "error: {wider} and {base} are not a fine-tune and its base: 14 "
     "of the 96 modules differ in shape (e.g. model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k: "
     "(32, 48) vs (32, 32))"),
    (["{other}", "--base", "{base}", "--rank", "4"], "error: {other} and {base} are not a fine-tune and its base: the "
     "difference is larger than the base weight in "),
    (["{base}", "--base", "{base}", "--rank", "4"], "error: {base} equals {base} in all 96 modules a LoRA can hold: "
     "nothing to extract"),
    (["{tuned}", "--base", "{tuned}.missing", "--rank", "4"], "error: checkpoint not found: {tuned}.missing"),
    (["--resize", "{tuned}", "--base", "{base}", "--rank", "4"], "error: --resize takes a LoRA file alone"),
    (["{tuned}", "--rank", "4"], "error: give the fine-tuned checkpoint and the --base it was fine-tuned from"),
    (["--resize", "{base}", "--rank", "4"], "error: {base} is a full SD v1 checkpoint, not a LoRA file"),
], ids=["energy-0", "energy-1.5", "no-rank", "rank-and-energy", "max-rank-with-rank", "other-shapes",
        "unrelated", "identical", "missing", "resize-and-base", "no-base", "resize-a-checkpoint"])
def test_each_bad_input_is_one_error_line(files, tmp_path, capsys, args, expected) -> None:
    output = ["-o", str(tmp_path / "lora.safetensors"), "--config", str(TINY_CONFIG)]
    assert script.main([arg.format(**files) for arg in args] + output) == 1
    assert error_lines(capsys)[0].startswith(expected.format(**files))
    assert not (tmp_path / "lora.safetensors").exists()


def test_the_command_extracts_and_resizes_tiny_checkpoint_files(base, files, tmp_path, capsys) -> None:
    output, resized = tmp_path / "dog.safetensors", tmp_path / "dog-r1.safetensors"
    assert script.main([files["tuned"], "--base", files["base"], "-o", str(output), "--energy", "0.999999", "--conv",
                        "--config", str(TINY_CONFIG)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["UNet input blocks", "UNet middle block",
                                                         "UNet output blocks", "text encoder", "all"]
    assert lines[4].startswith("all: 112 modules, ranks 1-3 (mean 2.0), energy kept 100.00 %, relative error 0.000")
    assert lines[5].startswith(f"wrote {output} (") and lines[5].endswith(" kB, 112 modules, fp16)")
    tensors, metadata = read_lora(output)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert metadata["ss_sd_model_name"] == "base.safetensors" and metadata["ss_network_dim"] == "3"
    state, tuned = merged(base, tensors), read_state_dict(files["tuned"])
    assert all(torch.allclose(state[key], tuned[key], atol=2e-3, rtol=0) for key in base)  # fp16 factors
    assert script.main(["--resize", str(output), "-o", str(resized), "--rank", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" kB, 112 modules, fp16)")
    tensors, resized_metadata = read_lora(resized)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {1}
    assert resized_metadata["ss_sd_model_name"] == "base.safetensors" and resized_metadata["ss_network_dim"] == "1"
    assert json.loads(resized_metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1.0"}  # no "dynamic"
