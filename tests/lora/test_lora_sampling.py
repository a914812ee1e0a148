"""LoRA files at sampling time: `--lora FILE[:SCALE]` in txt2img and img2img (scale 0 is the base, files add up,
metadata names them), and scripts/merge_lora.py (a merged checkpoint gives the applied output; the base's config is
chosen as sampling chooses it, and a base it does not fit is refused in one line)."""
import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from omegaconf import OmegaConf

from ldm.checkpoint import read_state_dict, save_lora, save_weights
from ldm.images import read_metadata
from ldm.lora.files import apply_lora_files, parse_lora_spec
from ldm.lora.layers import inject_lora, lora_tensors
from ldm.util import UserError, instantiate_from_config
from tests.helpers.other_tools import parse_infotext
from tests.helpers.repo import REPO, TINY_CONFIG, load_script
from tests.lora.test_lora import NAMES, TINY_UNET, outputs, randomise_lora, tiny

txt2img, img2img, merge_script = load_script("stable_txt2img"), load_script("img2img"), load_script("merge_lora")
SAMPLING = ["--config", str(TINY_CONFIG), "--device", "cpu", "--n_iter", "1", "--n_samples", "1", "--ddim_steps", "3",
            "--H", "64", "--W", "64", "--skip_grid", "--prompt", "a photo of sks dog"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base checkpoint and a LoRA file for it (UNet and text encoder, non-zero up weights)."""
    root = tmp_path_factory.mktemp("lora-sampling")
    base = root / "base.ckpt"
    save_weights(tiny().state_dict(), base)
    model = tiny()
    inject_lora(model, NAMES, rank=4, alpha=2, text_encoder=True)
    randomise_lora(model)
    lora = root / "dog.safetensors"
    save_lora(lora_tensors(model, NAMES), lora, base_hash="0" * 64)
    return base, lora


def sample(tmp_path, name, base, *extra):
    outdir = tmp_path / name
    assert txt2img.main([*SAMPLING, "--ckpt", str(base), "--outdir", str(outdir), *extra]) == 0
    return outdir / "samples" / "00000.png"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_scale_zero_is_the_base_and_scale_one_changes_the_image(tmp_path, files):
    base, lora = files
    plain = sample(tmp_path, "plain", base)
    zero = sample(tmp_path, "zero", base, "--lora", f"{lora}:0")
    one = sample(tmp_path, "one", base, "--lora", str(lora))
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.abs(pixels(plain) - pixels(one)).mean() > 1
    meta = read_metadata(one)
    assert meta["loras"] == [{"file": "dog.safetensors", "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
                              "scale": 1.0}]
    info = parse_infotext(Image.open(one).info["parameters"])
    assert info["Lora hashes"] == f'"dog: {meta["loras"][0]["sha256"][:10]}"'
    assert "loras" not in read_metadata(plain)


def test_two_files_add_up(tmp_path, files):
    base, lora = files
    model = tiny()
    before = outputs(model)
    records = apply_lora_files(model, {"params": {"unet_config": {"params": dict(TINY_UNET)}}},
                               [f"{lora}:0.5", f"{lora}:-0.5"])
    assert [r["scale"] for r in records] == [0.5, -0.5]
    for mine, theirs in zip(outputs(model), before):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    cancelled = sample(tmp_path, "cancelled", base, "--lora", f"{lora}:0.5", "--lora", f"{lora}:-0.5")
    assert np.abs(pixels(cancelled) - pixels(sample(tmp_path, "plain", base))).max() <= 1


def test_img2img_takes_lora_files(tmp_path, files):
    base, lora = files
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (120, 80, 40)).save(init)
    args = ["--config", str(TINY_CONFIG), "--device", "cpu", "--n_iter", "1", "--n_samples", "1", "--ddim_steps", "4",
            "--skip_grid", "--prompt", "a sks dog", "--init-img", str(init), "--ckpt", str(base)]
    assert img2img.main([*args, "--outdir", str(tmp_path / "a"), "--lora", f"{lora}:0.8"]) == 0
    assert read_metadata(tmp_path / "a" / "samples" / "00000.png")["loras"][0]["scale"] == 0.8


def test_lora_specs(tmp_path):
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    with pytest.raises(UserError, match="FILE:SCALE"):
        parse_lora_spec("a.safetensors:x")
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)) == (str(odd), 1.0)


def test_a_missing_or_wrong_lora_file_is_one_line(tmp_path, files, capsys):
    base, _ = files
    for lora, message in ((tmp_path / "nope.safetensors", "not found"), (base, "full SD v1 checkpoint, not a LoRA")):
        assert txt2img.main([*SAMPLING, "--ckpt", str(base), "--outdir", str(tmp_path), "--lora", str(lora)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_merged_checkpoint_gives_the_applied_output(tmp_path, files, capsys):
    base, lora = files
    merged = tmp_path / "merged.safetensors"
    assert merge_script.main([str(base), f"{lora}:0.7", "-o", str(merged), "--config", str(TINY_CONFIG)]) == 0
    assert "applied" in capsys.readouterr().out
    applied = tiny()
    apply_lora_files(applied, {"params": {"unet_config": {"params": dict(TINY_UNET)}}}, [f"{lora}:0.7"])
    loaded = tiny(seed=9)
    loaded.load_state_dict(read_state_dict(merged), strict=False)
    for mine, theirs in zip(outputs(loaded), outputs(applied)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    half = tmp_path / "half.ckpt"
    assert merge_script.main([str(base), str(lora), "-o", str(half), "--config", str(TINY_CONFIG), "--half"]) == 0
    assert read_state_dict(half)["model.diffusion_model.out.2.weight"].dtype == torch.float16


def test_merge_refuses_to_overwrite_an_input_or_take_a_non_lora(tmp_path, files, capsys):
    base, lora = files
    assert merge_script.main([str(base), str(lora), "-o", str(base), "--config", str(TINY_CONFIG)]) == 1
    assert "is one of the inputs" in capsys.readouterr().err
    out = tmp_path / "x.safetensors"
    assert merge_script.main([str(base), str(base), "-o", str(out), "--config", str(TINY_CONFIG)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a LoRA file" in err and not out.exists()


def test_merge_picks_the_bases_config_as_sampling_does_or_refuses_in_one_line(tmp_path, files, capsys):
    """Without --config a tiny base met the full-size config: the LoRA went into the wrong modules and it exited 0."""
    base, lora = files
    out = tmp_path / "merged.safetensors"
    assert merge_script.main([str(base), str(lora), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists()
    assert "does not match the model config" in err and "try --config configs/tiny/v1-inference.yaml" in err
    with torch.device("meta"):
        toy_shapes = instantiate_from_config(OmegaConf.load(REPO / "configs/toy/v1-inference.yaml").model).state_dict()
    toy = tmp_path / "toy.safetensors"
    save_weights({key: torch.zeros(value.shape) for key, value in toy_shapes.items()}, toy)
    assert merge_script.main([str(toy), str(lora), "-o", str(out), "--config", str(TINY_CONFIG)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "try --config configs/toy/v1-inference.yaml" in err and not out.exists()
    run = tmp_path / "run"  # a file in a run's checkpoints/ brings the run's saved config, as for sampling
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    shutil.copy(base, run / "checkpoints" / "last.ckpt")
    shutil.copy(TINY_CONFIG, run / "configs" / "2026-12-07T00-00-00-project.yaml")
    assert merge_script.main([str(run / "checkpoints" / "last.ckpt"), f"{lora}:0.7", "-o", str(out)]) == 0
    explicit = tmp_path / "explicit.safetensors"
    assert merge_script.main([str(base), f"{lora}:0.7", "-o", str(explicit), "--config", str(TINY_CONFIG)]) == 0
    merged, expected = read_state_dict(out), read_state_dict(explicit)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
