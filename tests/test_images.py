"""Grids and PNG metadata: labelled grids with Pillow's own font (or none), infotext that A1111 parses, JSON we read."""
import json

import numpy as np
import pytest
from PIL import Image, ImageFont

from ldm.images import infotext, labelled_grid, read_metadata, save_image
from tests.helpers.other_tools import parse_infotext


def tiles(n: int, colour=(200, 30, 30)) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), colour) for _ in range(n)]


def test_labelled_grid_has_a_title_strip_and_row_labels():
    grid = labelled_grid([("instance", tiles(2)), ("class", tiles(2, (0, 0, 200)))], 4, "photo of a sks dog")
    pixels = np.asarray(grid)
    strip = grid.height - 2 * (32 + 4)
    assert strip >= 10 and grid.width > 2 * 34 + 2
    assert len(np.unique(pixels[:strip].reshape(-1, 3), axis=0)) > 2  # text drawn on the title strip
    label_column = pixels[strip:, : grid.width - (2 * 34 + 2)]
    assert len(np.unique(label_column.reshape(-1, 3), axis=0)) > 2  # and beside the rows
    assert tuple(pixels[strip + 4 + 16, -20]) == (200, 30, 30) and tuple(pixels[-20, -20]) == (0, 0, 200)


def test_labelled_grid_without_a_font_still_draws(monkeypatch):
    def no_font(*args, **kwargs):
        raise OSError("cannot open resource")

    monkeypatch.setattr(ImageFont, "load_default", no_font)
    grid = labelled_grid([("instance", tiles(3))], 2, "a prompt with ünïcödé ✓ that is far too long to fit")
    assert grid.size == (8 + 2 * 34 + 2, 14 + 2 * 34 + 2)


def test_labels_in_unicode_do_not_crash():
    grid = labelled_grid([("instance", tiles(1))], 1, "写真 of a sks 犬 ✓")
    assert grid.width >= 34


def test_png_carries_infotext_and_our_json(tmp_path):
    metadata = {"prompt": "photo of a sks dog, on the beach", "negative_prompt": "blurry", "seed": 7, "steps": 20,
                "sampler": "dpmpp_2m", "karras": True, "scale": 7.5, "eta": 0.0, "width": 32, "height": 32,
                "checkpoint": "my, model.ckpt", "checkpoint_sha256": "0123456789abcdef" * 4}
    path = tmp_path / "00000.png"
    save_image(tiles(1)[0], path, metadata)
    text = Image.open(path).text
    assert text["parameters"].splitlines() == [
        "photo of a sks dog, on the beach", "Negative prompt: blurry",
        'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 7, Size: 32x32, Model hash: 0123456789, '
        'Model: "my, model", Eta: 0.0']
    info = parse_infotext(text["parameters"])
    assert (info["Prompt"], info["Model"], info["Sampler"]) == ("photo of a sks dog, on the beach", '"my, model"',
                                                               "DPM++ 2M Karras")
    assert json.loads(text["dreambooth"]) == metadata == read_metadata(path)
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"]


def test_images_without_a_prompt_carry_json_only(tmp_path):
    save_image(tiles(1)[0], tmp_path / "inputs.png", {"step": 3})
    assert set(Image.open(tmp_path / "inputs.png").text) == {"dreambooth"}


def test_older_pngs_with_json_under_parameters_still_read(tmp_path):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", json.dumps({"prompt": "a dog", "seed": 1}))
    tiles(1)[0].save(tmp_path / "old.png", pnginfo=info)
    assert read_metadata(tmp_path / "old.png") == {"prompt": "a dog", "seed": 1}


def test_the_infotext_helper_can_fail():
    with pytest.raises(AssertionError, match="not infotext"):
        parse_infotext(json.dumps({"prompt": "a dog", "steps": 50}))
    assert "Steps: 50" in infotext({"prompt": "a dog", "steps": 50, "sampler": "ddim", "scale": 7.5}, (64, 64))
