"""CLIP skip (A1111 and kohya's convention): parity with transformers' hidden states, validation, and sampling with
`stable_txt2img.py --clip_skip`, recorded in the PNG infotext (training with `main.py --clip_skip`:
tests/e2e/test_clip_skip_e2e.py)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoint import save_weights
from ldm.images import read_metadata
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import UserError
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.other_tools import parse_infotext
from tests.helpers.repo import REPO, TINY_CONFIG, load_script

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
PROMPT = "a photo of sks dog"
SAMPLE = ["--device", "cpu", "--n_iter", "1", "--n_samples", "1", "--ddim_steps", "2", "--skip_grid",
          "--prompt", PROMPT, "--seed", "7"]

txt2img = load_script("stable_txt2img")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A 3-layer tiny text encoder's weights, moved off their initial values so that the layer norms matter."""
    torch.manual_seed(0)
    embedder = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    with torch.no_grad():
        for param in embedder.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return embedder.state_dict()


def embedder_with(weights: dict[str, torch.Tensor], **kwargs) -> FrozenCLIPEmbedder:
    embedder = FrozenCLIPEmbedder(text_config=TINY_TEXT, **kwargs)
    embedder.load_state_dict(weights, strict=True)
    return embedder


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_is_the_earlier_hidden_state_through_the_final_layer_norm(weights, clip_skip):
    reference = CLIPTextModel(CLIPTextConfig(**TINY_TEXT, attn_implementation="eager")).eval()
    reference.load_state_dict({k.removeprefix("transformer.text_model."): v for k, v in weights.items()}, strict=True)
    embedder = embedder_with(weights, clip_skip=clip_skip)
    with torch.no_grad():
        ours = embedder([PROMPT])
        out = reference(input_ids=embedder.tokenize([PROMPT]), output_hidden_states=True)
        theirs = reference.final_layer_norm(out.hidden_states[-clip_skip])
    assert ours.shape == (1, 77, 32)
    assert (theirs - out.last_hidden_state).abs().max() > 0.1  # the tiny model's layers do change the states
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-5, f"clip_skip {clip_skip}: max abs diff vs transformers' hidden_states[-{clip_skip}]: {err:.3e}"


def test_clip_skip_1_is_the_default_and_the_plain_last_hidden_state(weights):
    embedder = embedder_with(weights)
    assert embedder.clip_skip == 1
    text_model, calls = embedder.transformer.text_model, []
    forward = text_model.forward
    text_model.forward = lambda *args, **kwargs: calls.append(kwargs) or forward(*args, **kwargs)
    with torch.no_grad():
        ours = embedder([PROMPT])
        plain = forward(input_ids=embedder.tokenize([PROMPT])).last_hidden_state
    assert torch.equal(ours, plain)
    assert len(calls) == 1 and not calls[0].get("output_hidden_states")  # no hidden states kept that are not used


@pytest.mark.parametrize("value", [0, -1, 4, 1.5, "2", True, None])
def test_a_bad_clip_skip_is_refused_with_the_range(weights, value):
    with pytest.raises(UserError, match=rf"^clip_skip {value!r} \(--clip_skip, model\.params\.cond_stage_config\."
                                        r"params\.clip_skip\): expected an integer from 1 \(the last layer\) to 3 "):
        FrozenCLIPEmbedder(text_config=TINY_TEXT, clip_skip=value)


def test_a_bad_clip_skip_is_one_line_from_txt2img_and_main(tmp_path, capsys, monkeypatch, tiny_ckpt):
    code = txt2img.main([*SAMPLE, "--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--outdir",
                         str(tmp_path / "out"), "--clip_skip", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "\n" not in err
    assert "clip_skip 3 " in err and "from 1 (the last layer) to 2" in err
    spec = importlib.util.spec_from_file_location("dreambooth_main", REPO / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # main's seed_everything sets them: restored after the test
        monkeypatch.setenv(name, "0")
    photos, classes = make_photos(tmp_path / "photos"), make_photos(tmp_path / "class")
    code = main.main(train_args(tiny_ckpt, photos, classes, tmp_path / "logs", "--clip_skip", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: clip_skip 0 ") and "from 1 (the last layer) to 2" in err[-1]


def test_skipped_layers_stay_frozen_when_the_text_encoder_trains():
    """Every parameter that asks for a gradient gets one (DDP's rule), and the last layer, unused, asks for none."""
    config = OmegaConf.load(TINY_CONFIG).model.params.cond_stage_config
    config.params.clip_skip = 2
    model = build_tiny_model(cond_stage_trainable=True, cond_stage_config=config)
    encoder = model.cond_stage_model
    model.get_learned_conditioning([PROMPT]).square().sum().backward()
    last = {id(p) for p in encoder.transformer.text_model.encoder.layers[-1].parameters()}
    for name, param in encoder.named_parameters():
        assert param.requires_grad == (id(param) not in last), name
        assert (param.grad is not None) == param.requires_grad, name


def make_photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (64, 64), (200 - 80 * k, 60, 40 + 80 * k)).save(folder / f"dog{k}.png")
    return folder


def train_args(ckpt: Path, photos: Path, classes: Path, logdir: Path, *extra: str) -> list[str]:
    return ["--base", "configs/tiny/v1-finetune_unfrozen.yaml", "-t", "--actual_resume", str(ckpt), "-n", "skip",
            "--accelerator", "cpu", "--data_root", str(photos), "--reg_data_root", str(classes), "--class_word", "dog",
            "-l", str(logdir), *extra]


def sample(capsys, ckpt: Path, outdir: Path, *extra: str) -> Path:
    """Run stable_txt2img.py with SAMPLE; the one image it wrote."""
    code = txt2img.main([*SAMPLE, "--ckpt", str(ckpt), "--outdir", str(outdir), *extra])
    assert code == 0, capsys.readouterr().err
    (path,) = (outdir / "samples").iterdir()
    return path


@pytest.fixture(scope="module")
def busy_ckpt(tmp_path_factory) -> Path:
    """Tiny weights with the zero-initialised UNet layers made random, so that the conditioning shows in the image."""
    model = randomise_zero_init(build_tiny_model(seed=5), seed=5)
    path = tmp_path_factory.mktemp("clip_skip") / "tiny-busy.ckpt"
    save_weights(model.state_dict(), path)
    return path


def test_txt2img_clip_skip_changes_the_image_and_is_recorded(tmp_path, capsys, busy_ckpt):
    common = ["--config", str(TINY_CONFIG), "--H", "64", "--W", "64"]
    plain = sample(capsys, busy_ckpt, tmp_path / "one", *common)
    again = sample(capsys, busy_ckpt, tmp_path / "again", *common, "--clip_skip", "1")
    skipped = sample(capsys, busy_ckpt, tmp_path / "two", *common, "--clip_skip", "2")
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in (plain, again, skipped)]
    assert np.array_equal(pixels[0], pixels[1])
    assert np.abs(pixels[0] - pixels[2]).mean() > 1.0
    assert "Clip skip" not in Image.open(plain).text["parameters"] and "clip_skip" not in read_metadata(plain)
    info = parse_infotext(Image.open(skipped).text["parameters"])
    assert info["Clip skip"] == "2" and info["Seed"] == "7" and info["Prompt"] == PROMPT
    assert read_metadata(skipped)["clip_skip"] == 2
