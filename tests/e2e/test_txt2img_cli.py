"""scripts/stable_txt2img.py and scripts/img2img.py end to end on a tiny SD v1 checkpoint written here."""
import errno
import hashlib
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import save_weights
from ldm.config import load_config, native_size
from ldm.images import SAMPLER_DISPLAY_NAMES, read_metadata
from ldm.inference.flags import SAMPLER_NAMES
from ldm.models.diffusion.sampling import STOCHASTIC
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.other_tools import parse_infotext
from tests.helpers.repo import FULL_CONFIG, REPO, TINY_CONFIG, load_script

pytestmark = pytest.mark.e2e

COMMON = ["--config", str(TINY_CONFIG), "--device", "cpu", "--n_iter", "1", "--n_samples", "2", "--ddim_steps", "3"]
TINY = [*COMMON, "--H", "64", "--W", "64"]


txt2img, img2img = load_script("stable_txt2img"), load_script("img2img")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny weights with the zero-initialised UNet layers made random, so that every sampler has work to do."""
    model = randomise_zero_init(build_tiny_model(seed=3), seed=3)
    path = tmp_path_factory.mktemp("cli") / "tiny-sd.ckpt"
    save_weights(model.state_dict(), path)
    return path


def run(script, capsys, *args: str) -> tuple[int, str]:
    code = script.main([*(TINY if script is txt2img else COMMON), *args])
    return code, capsys.readouterr().err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("sampler,extra", [(s, []) for s in SAMPLER_NAMES] + [("euler_a", ["--karras"])])
def test_every_sampler_writes_samples_grid_and_metadata(tmp_path, capsys, ckpt, sampler, extra):
    code, err = run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--sampler", sampler,
                    "--prompt", "a photo of sks dog", "--negative_prompt", "blurry", "--seed", "5", *extra)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png"]
    assert Image.open(tmp_path / "samples" / "00001.png").size == (64, 64)
    assert Image.open(tmp_path / "grid-0000.png").size == (2 * 66 + 2, 66 + 2)
    meta = read_metadata(tmp_path / "samples" / "00001.png")
    tolerances = {"rtol": 0.05, "atol": 0.0078} if sampler == "dpm_adaptive" else {}
    assert meta == {"prompt": "a photo of sks dog", "negative_prompt": "blurry", "seed": 6, "sampler": sampler,
                    "karras": bool(extra), "steps": 3, "scale": 7.5, "eta": 0.0, "width": 64, "height": 64,
                    "checkpoint": ckpt.name, "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
                    **tolerances}
    assert read_metadata(tmp_path / "grid-0000.png")["seeds"] == [5, 6]
    assert (pixels(tmp_path / "samples" / "00000.png") != pixels(tmp_path / "samples" / "00001.png")).any()
    info = parse_infotext(Image.open(tmp_path / "samples" / "00001.png").text["parameters"])  # as A1111 reads it
    assert info == {"Prompt": "a photo of sks dog", "Negative prompt": "blurry", "Steps": "3",
                    "Sampler": SAMPLER_DISPLAY_NAMES[sampler] + (" Karras" if extra else ""), "CFG scale": "7.5",
                    "Seed": "6", "Size": "64x64", "Model hash": meta["checkpoint_sha256"][:10], "Model": "tiny-sd",
                    "Eta": "0.0"}
    assert parse_infotext(Image.open(tmp_path / "grid-0000.png").text["parameters"])["Seed"] == "5"


def test_numbering_continues_and_prompts_from_file_get_a_grid_each(tmp_path, capsys, ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\na cat\n")
    out = tmp_path / "out"
    assert run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(out), "--skip_grid")[0] == 0
    assert run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(out), "--from-file", str(prompts),
               "--n_rows", "1")[0] == 0
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"{i:05}.png" for i in range(6)]
    assert [read_metadata(out / "samples" / n)["prompt"] for n in names[2:]] == ["a dog"] * 2 + ["a cat"] * 2
    assert [read_metadata(out / "samples" / n)["seed"] for n in names[2:]] == [42, 43, 44, 45]
    assert Image.open(out / "grid-0001.png").size == (66 + 2, 2 * 66 + 2)


@pytest.mark.parametrize("sampler", [*STOCHASTIC, "dpm_adaptive"])
def test_same_seed_same_images_and_one_image_regenerates_alone(tmp_path, capsys, ckpt, sampler):
    """The stochastic samplers draw their noise from each image's seed; dpm_adaptive picks each image's steps."""
    common = ["--ckpt", str(ckpt), "--sampler", sampler, "--n_samples", "3", "--skip_grid", "--seed", "11"]
    assert run(txt2img, capsys, *common, "--outdir", str(tmp_path / "a"))[0] == 0
    assert run(txt2img, capsys, *common, "--outdir", str(tmp_path / "b"))[0] == 0
    for name in ["00000.png", "00001.png", "00002.png"]:
        assert np.array_equal(pixels(tmp_path / "a" / "samples" / name), pixels(tmp_path / "b" / "samples" / name))
    seed = read_metadata(tmp_path / "a" / "samples" / "00002.png")["seed"]
    assert run(txt2img, capsys, *common[:-1], str(seed), "--n_samples", "1", "--outdir", str(tmp_path / "c"))[0] == 0
    # Batch size changes float rounding in the model, not the noise: at most one 8-bit level apart.
    alone, in_batch = pixels(tmp_path / "c" / "samples" / "00000.png"), pixels(tmp_path / "a" / "samples" / "00002.png")
    assert np.abs(alone - in_batch).max() <= 1


def test_fixed_code_reuses_the_seeds_of_the_first_batch(tmp_path, capsys, ckpt):
    assert run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--n_iter", "2", "--fixed_code")[0] == 0
    seeds = [read_metadata(p)["seed"] for p in sorted((tmp_path / "samples").iterdir())]
    assert seeds == [42, 43, 42, 43]
    assert np.array_equal(pixels(tmp_path / "samples" / "00000.png"), pixels(tmp_path / "samples" / "00002.png"))


@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler", "dpmpp_2m"])
def test_img2img_writes_samples_with_strength(tmp_path, capsys, ckpt, sampler):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(init)
    code, err = run(img2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"), "--init-img", str(init),
                    "--sampler", sampler, "--strength", "0.7", "--ddim_steps", "4", "--keep_size")
    assert code == 0, err
    meta = read_metadata(tmp_path / "out" / "samples" / "00001.png")
    assert (meta["strength"], meta["init_image"], meta["sampler"]) == (0.7, "init.png", sampler)
    info = parse_infotext(Image.open(tmp_path / "out" / "samples" / "00001.png").text["parameters"])
    assert (info["Denoising strength"], info["Size"], "Negative prompt:" in info["Prompt"]) == ("0.7", "80x64", False)
    assert Image.open(tmp_path / "out" / "samples" / "00001.png").size == (80, 64)



def test_img2img_samples_an_exif_rotated_photo_upright_at_the_models_size(tmp_path, capsys, caplog, ckpt):
    """A 780x520 photo stored on its side with an EXIF orientation: sampled upright at the tiny model's 64x64 area."""
    init, exif = tmp_path / "photo.jpg", Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.new("RGB", (780, 520), (200, 120, 40)).rotate(90, expand=True).save(init, exif=exif)
    with caplog.at_level(logging.INFO):
        code, err = run(img2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"), "--init-img",
                        str(init), "--n_samples", "1", "--skip_grid", "--ddim_steps", "2")
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "samples" / "00000.png").size == (80, 48)
    meta = read_metadata(tmp_path / "out" / "samples" / "00000.png")
    assert (meta["width"], meta["height"]) == (80, 48)
    assert "init image 780x520 resized to 80x48 (sides a multiple of 16; the model's 64x64 area)" in caplog.text

def bad_config(tmp_path) -> str:
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.model_channels = 64
    path = tmp_path / "wider.yaml"
    OmegaConf.save(config, path)
    return str(path)


BAD_INPUTS = {
    "missing checkpoint": (lambda tmp, ckpt: ["--ckpt", str(tmp / "nope.ckpt")], "checkpoint not found"),
    "half-downloaded checkpoint": (lambda tmp, ckpt: ["--ckpt", str(truncated(tmp, ckpt))],
                                   "is the download complete?"),
    "config that does not match": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--config", bad_config(tmp)],
                                   "does not match the model config in 285 tensors, e.g. "),
    "... names the config that fits": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--config", bad_config(tmp)],
                                       "; try --config configs/tiny/v1-inference.yaml"),
    "text file renamed .ckpt": (lambda tmp, ckpt: ["--ckpt", str(text_file(tmp))],
                                "page.ckpt is not a checkpoint but a web page "
                                "(it begins '<html><body>Not Found</body></html>')"),
    "a folder as --ckpt": (lambda tmp, ckpt: ["--ckpt", str(tmp)], "is a folder, not a checkpoint file"),
    "a diffusers folder": (lambda tmp, ckpt: ["--ckpt", str(diffusers_folder(tmp))],
                           "is a diffusers folder without unet/config.json"),
    "weights with inf": (lambda tmp, ckpt: ["--ckpt", str(diverged(tmp))],
                         "tensor model.diffusion_model.input_blocks.0.0.weight holds 1 NaN or inf values (of 1152)"),
    "outdir under a file": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--outdir", str(text_file(tmp) / "out")],
                            "page.ckpt is a file, not a folder"),
    "H not a multiple of 8": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--H", "60"],
                              "--H 60 must be a positive multiple of 16"),
    "W fine for the VAE, not the UNet": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--W", "72"], "try 64 or 80"),
    "empty prompt file": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--from-file", str(empty(tmp))], "holds no prompts"),
    "karras with ddim": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--karras"],
                         "--karras applies to the samplers that follow a sigma schedule"),
    "karras with dpm_fast": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--sampler", "dpm_fast", "--karras"],
                             "not to dpm_fast"),
    "tolerance for euler": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--sampler", "euler", "--rtol", "0.1"],
                            "--rtol and --atol apply to the dpm_adaptive sampler only"),
    "tolerance of 0": (lambda tmp, ckpt: ["--ckpt", str(ckpt), "--sampler", "dpm_adaptive", "--atol", "0"],
                       "--atol must be above 0"),
}


def text_file(tmp_path):
    (tmp_path / "page.ckpt").write_text("<html><body>Not Found</body></html>")
    return tmp_path / "page.ckpt"


def diffusers_folder(tmp_path):
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text("{}")
    return tmp_path / "sd15"


def diverged(tmp_path):
    state = build_tiny_model().state_dict()
    state["model.diffusion_model.input_blocks.0.0.weight"][0, 0, 0, 0] = float("inf")
    save_weights(state, tmp_path / "diverged.safetensors")
    return tmp_path / "diverged.safetensors"


def truncated(tmp_path, ckpt):
    (tmp_path / "partial.ckpt").write_bytes(ckpt.read_bytes()[:100_000])
    return tmp_path / "partial.ckpt"


def empty(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n  \n")
    return tmp_path / "prompts.txt"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_that_says_what_to_do(tmp_path, capsys, ckpt, case):
    make_args, expected = BAD_INPUTS[case]
    code, err = run(txt2img, capsys, "--outdir", str(tmp_path / "out"), *make_args(tmp_path, ckpt))
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_a_run_brings_its_config_and_native_size(tmp_path, capsys, caplog, ckpt):
    run_dir = tmp_path / "logs" / "2026-01-01T00-00-00_job"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "configs").mkdir()
    shutil.copy(ckpt, run_dir / "checkpoints" / "last.ckpt")
    for stamp in ("2025-12-31T00-00-00", "2026-01-01T00-00-00"):  # a resumed run saves one per session
        shutil.copy(TINY_CONFIG, run_dir / "configs" / f"{stamp}-project.yaml")
    args = ["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--outdir", str(tmp_path / "out"), "--device",
            "cpu", "--n_iter", "1", "--n_samples", "1", "--ddim_steps", "2"]
    with caplog.at_level(logging.INFO):
        assert txt2img.main(args) == 0, capsys.readouterr().err
    assert f"using the config that trained {run_dir / 'checkpoints' / 'last.ckpt'}: " \
           f"{run_dir / 'configs' / '2026-01-01T00-00-00-project.yaml'}" in caplog.text
    assert Image.open(tmp_path / "out" / "samples" / "00000.png").size == (64, 64)  # image_size 8 x f 8


def test_native_size_of_the_sd_v1_config_is_512():
    assert native_size(load_config(str(FULL_CONFIG))) == 512 and native_size(load_config(str(TINY_CONFIG))) == 64


def test_negative_scale_warns(tmp_path, capsys, caplog, ckpt):
    with caplog.at_level(logging.WARNING):
        code, _ = run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--scale", "-2",
                      "--n_samples", "1", "--skip_grid")
    assert code == 0
    assert "--scale -2 is below 0: guidance then pushes the images away from the prompt" in caplog.text


@pytest.mark.parametrize("fault", ["no space left", "ENOSPC while writing"])
def test_a_full_disk_keeps_whole_images_only(tmp_path, capsys, monkeypatch, ckpt, fault):
    samples = tmp_path / "out" / "samples"
    if fault == "no space left":
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=500)
                            if (samples / "00000.png").exists() else real(path))
    else:
        save = Image.Image.save

        def fails_on_the_second(image, fp, *args, **kwargs):
            if (samples / "00000.png").exists():
                Path(fp).write_bytes(b"\x89PNG half")
                raise OSError(errno.ENOSPC, "No space left on device")
            return save(image, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", fails_on_the_second)
    code, err = run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"))
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert re.fullmatch(rf"error: not enough disk space for {samples / '00001.png'}: it needs about [\d.]+ kB, "
                        r"[\d.]+ [kMGT]?B free; stopped, the 1 images written before it are kept", line), line
    assert [p.name for p in samples.iterdir()] == ["00000.png"] and (samples / "00000.png").stat().st_size > 100


def test_cuda_asked_without_a_gpu(tmp_path, capsys, ckpt):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so --device cuda is not an error here")
    code, err = run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--device", "cuda")
    assert code == 1 and "sees no CUDA GPU; use --device auto or cpu" in err


def test_long_prompt_warns_where_it_was_cut(tmp_path, capsys, caplog, ckpt):
    prompt = " ".join(f"word{i}" for i in range(60))
    with caplog.at_level(logging.WARNING):
        code, _ = run(txt2img, capsys, "--ckpt", str(ckpt), "--outdir", str(tmp_path), "--prompt", prompt)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "longer than 77" in r.getMessage()]
    assert len(warnings) == 1 and "cut after" in warnings[0], warnings


def test_real_command_lines(tmp_path, ckpt):
    """One good and one bad run as users start them: a separate process, from the repository root."""
    script = [sys.executable, "scripts/stable_txt2img.py", *TINY, "--outdir", str(tmp_path)]
    good = subprocess.run([*script, "--ckpt", str(ckpt), "--n_samples", "1"], cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "samples" / "00000.png").is_file() and (tmp_path / "grid-0000.png").is_file()
    bad = subprocess.run([*script, "--ckpt", "missing.ckpt"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found: missing.ckpt")
