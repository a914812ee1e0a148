"""Masked loss: masks found beside photos or in masks/, cut, resized and mirrored with their photo, a floor; an
all-white mask gives the unmasked loss bit for bit, a black region changes nothing; cached latents keep masks (a
run that trains with them: tests/e2e/test_masks_e2e.py)."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.image_files import DataError
from ldm.data.personalized import PersonalizedBase
from ldm.modules.encoders.clipseg import ClipSegMasker
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer
from ldm.modules.losses import NoiseObjective
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import load_script


def photo_with_mask(folder, name, size=(96, 64), where="beside"):
    """A photo whose left half is red, and a mask that is white exactly there."""
    pixels = np.full((size[1], size[0], 3), 40, np.uint8)
    pixels[:, : size[0] // 2] = (220, 30, 30)
    Image.fromarray(pixels).save(folder / f"{name}.png")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, : size[0] // 2] = 255
    target = folder / f"{name}.mask.png" if where == "beside" else folder / "masks" / f"{name}.jpg"
    target.parent.mkdir(exist_ok=True)
    Image.fromarray(mask).save(target, quality=100)


def test_masks_are_found_cut_and_mirrored_with_their_photos(tmp_path):
    photo_with_mask(tmp_path, "a")
    photo_with_mask(tmp_path, "b", size=(64, 64), where="folder")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "c.png")  # no mask: it weighs everywhere 1
    data = PersonalizedBase(str(tmp_path), size=32, repeats=1, crop="none", mask_floor=0.1)
    assert [p.name for p in data.paths] == ["a.png", "b.png", "c.png"]  # masks are not training photos
    for flip in (False, True):
        image, mask = data.example(0, flip)
        red = image[..., 0] > 0.5
        assert torch.equal(mask > 0.5, red) and mask.min() == pytest.approx(0.1)
        assert bool(red[:, -1].all()) == flip
    assert data.example(1, False)[1][:, :8].min() > 0.95
    assert torch.equal(data.example(2, False)[1], torch.ones(32, 32))
    assert set(data[0]) == {"image", "caption", "mask"}
    centre = PersonalizedBase(str(tmp_path), size=32, repeats=1, crop="center", flip_p=0.0)
    image, mask = centre.example(0)
    assert torch.equal(mask > 0.5, image[..., 0] > 0.5)  # the same square cut of photo and mask
    Image.new("L", (50, 50)).save(tmp_path / "c.mask.png")
    with pytest.raises(DataError, match="c.mask.png: the mask is 50x50, its photo 64x64"):
        PersonalizedBase(str(tmp_path), size=32, repeats=1).example(2)


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (64, 64), 0), "a.mask.png: the mask has no white pixel (its brightest is 0 of 255)"),
    (Image.new("L", (64, 64), 1), "a.mask.png: the mask has no white pixel (its brightest is 1 of 255)"),
    (b"\x89PNG\r\n\x1a\n truncated", "a.mask.png: cannot read this image"),
])
def test_black_and_corrupt_masks_are_refused_when_the_data_is_set_up(tmp_path, mask, message):
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "a.png")
    if isinstance(mask, bytes):
        (tmp_path / "a.mask.png").write_bytes(mask)
    else:
        mask.save(tmp_path / "a.mask.png")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PersonalizedBase(str(tmp_path), size=32, repeats=1)


def test_the_log_says_how_many_photos_have_a_mask(tmp_path, caplog):
    photo_with_mask(tmp_path, "a")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "c.png")
    with caplog.at_level(logging.INFO, logger="ldm.data.personalized"):
        PersonalizedBase(str(tmp_path), size=32, repeats=1)
    assert "1 of 2 photos have a loss mask" in caplog.text


def test_cached_latents_keep_the_masks(tmp_path):
    photo_with_mask(tmp_path, "a", size=(64, 64))
    data = PersonalizedBase(str(tmp_path), size=32, repeats=2, flip_p=0.5)
    data.use_moments(torch.zeros(1, 2, 8, 4, 4))
    items = [data[i] for i in range(2)]
    assert all(set(item) == {"moments", "caption", "mask"} for item in items)
    assert torch.equal(items[0]["mask"], data.example(0, False)[1]) or torch.equal(items[0]["mask"],
                                                                                     data.example(0, True)[1])


def test_a_white_mask_is_the_plain_loss_and_black_regions_change_nothing():
    objective = NoiseObjective(loss_type="huber")
    alphas, t = torch.linspace(0.99, 0.01, 1000), torch.tensor([10, 900])
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    plain = objective.per_sample(prediction, target, t, alphas, 1000)
    assert torch.equal(objective.per_sample(prediction, target, t, alphas, 1000, torch.ones(2, 1, 8, 8)), plain)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    changed = prediction.clone()
    changed[..., 4:] += 5.0
    masked = objective.per_sample(prediction, target, t, alphas, 1000, mask)
    assert torch.equal(objective.per_sample(changed, target, t, alphas, 1000, mask), masked)
    left = NoiseObjective(loss_type="huber").per_sample(prediction[..., :4], target[..., :4], t, alphas, 1000)
    assert torch.allclose(masked, left, rtol=1e-6)

    model = build_tiny_model()
    batch = {model.first_stage_key: torch.rand(2, 64, 64, 3) * 2 - 1, model.cond_stage_key: ["photo of a sks dog"] * 2}
    t, noise = torch.tensor([5, 500]), torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    without = model.shared_step(batch, t, noise)["loss"]
    torch.manual_seed(0)
    white = model.shared_step({**batch, "mask": torch.ones(2, 64, 64)}, t, noise)["loss"]
    assert torch.equal(without, white)


@pytest.fixture(scope="module")
def clipseg_folder(tmp_path_factory):
    """A tiny random CLIPSeg with the real tokenizer and a ViT processor config, saved as a transformers folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clipseg")
    torch.manual_seed(0)
    config = transformers.CLIPSegConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=16, extract_layers=[1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    transformers.CLIPSegForImageSegmentation(config).save_pretrained(folder)
    load_tokenizer(TOKENIZER_DIR).save_pretrained(folder)
    transformers.ViTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_make_masks_thresholds_pads_and_feathers(tmp_path, clipseg_folder):
    make_masks = load_script("make_masks")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (90, 70)), ("b", (64, 100))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(photos / f"{name}.png")
    assert make_masks.main(["--input_dir", str(photos), "--text", "dog", "--clipseg", str(clipseg_folder),
                            "--threshold", "0.5", "--padding", "0", "--feather", "0"]) == 0
    masker = ClipSegMasker(clipseg_folder)
    probabilities = masker.probabilities(Image.open(photos / "a.png").convert("RGB"), "dog")
    mask = np.asarray(Image.open(photos / "a.mask.png"))
    assert mask.shape == (70, 90) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, probabilities >= 0.5)
    assert [p.name for p in PersonalizedBase(str(photos), size=32, repeats=1).paths] == ["a.png", "b.png"]
    image = Image.open(photos / "a.png").convert("RGB")
    threshold = float(np.median(probabilities))
    plain, padded = masker.mask(image, "dog", threshold, 0, 0), masker.mask(image, "dog", threshold, 3, 0)
    assert (np.asarray(padded) > 0).sum() > (np.asarray(plain) > 0).sum()
    soft = np.asarray(masker.mask(image, "dog", threshold, 0, 2.0))
    assert ((soft > 0) & (soft < 255)).any()


def test_make_masks_keeps_existing_masks_unless_overwrite(tmp_path, clipseg_folder, capsys):
    make_masks = load_script("make_masks")
    photos = tmp_path / "photos"
    (photos / "masks").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 48), (40, 90, 200)).save(photos / f"{name}.png")
    Image.new("L", (64, 48), 255).save(photos / "a.mask.png")  # hand-edited masks, beside and in masks/
    Image.new("L", (64, 48), 128).save(photos / "masks" / "b.png")
    hand_made = (photos / "a.mask.png").read_bytes()
    args = ["--input_dir", str(photos), "--text", "dog", "--clipseg", str(clipseg_folder)]
    assert make_masks.main(args) == 0
    assert capsys.readouterr().out.strip() == (f"wrote 1 masks to {photos}; kept 2 that existed (--overwrite "
                                               "replaces them)")
    assert (photos / "a.mask.png").read_bytes() == hand_made and not (photos / "b.mask.png").exists()
    assert (photos / "c.mask.png").is_file()
    assert make_masks.main(args[:-1] + [str(tmp_path / "no-model")]) == 0  # nothing to do: no model is loaded
    assert make_masks.main(args + ["--overwrite"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote 3 masks to {photos}")
    assert (photos / "a.mask.png").read_bytes() != hand_made


def test_make_masks_names_the_model_to_download(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    code = load_script("make_masks").main(["--input_dir", str(tmp_path / "photos"), "--text", "dog", "--clipseg",
                                           str(tmp_path / "nothing")])
    assert code == 1 and "CIDAS/clipseg-rd64-refined" in capsys.readouterr().err
