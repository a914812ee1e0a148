"""DreamBooth data: real-world photo folders (EXIF, colour modes, stray files), captions, pairing, clear errors."""
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.captions import caption_from_filename
from ldm.data.concepts import ConceptPairs
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.image_files import DataError
from ldm.data.personalized import PersonalizedBase
from ldm.images import read_metadata
from ldm.training.class_images import generate_class_images
from ldm.util import UserError
from tests.helpers.models import build_tiny_model, randomise_zero_init

RED, BLUE, WHITE = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (1.0, 1.0, 1.0)


def solid(mode: str, size=(80, 72), color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def dataset(folder, **params) -> PersonalizedBase:
    return PersonalizedBase(data_root=str(folder), size=64, repeats=2, flip_p=0.0, **params)


def pixel(example, row: int, column: int) -> tuple[float, ...]:
    return tuple(round(float(v), 1) for v in example["image"][row, column])


def test_sizes_modes_and_range(tmp_path):
    solid("RGB", (97, 61)).save(tmp_path / "odd.jpg", quality=95)
    solid("L").save(tmp_path / "grey.png")
    solid("CMYK").save(tmp_path / "cmyk.jpg")
    solid("P").save(tmp_path / "palette.gif")
    data = dataset(tmp_path)
    assert len(data) == 4 * 2
    for index in range(len(data)):
        example = data[index]
        assert example["image"].shape == (64, 64, 3) and example["image"].dtype == torch.float32
        assert -1.0 <= example["image"].min() and example["image"].max() <= 1.0
        assert example["caption"] == "photo of a sks dog"


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (64, 32))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the stored left half (red) ends up on top
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    example = dataset(tmp_path, crop="none")[0]
    assert pixel(example, 8, 32) == pytest.approx(RED, abs=0.1)
    assert pixel(example, 56, 32) == pytest.approx(BLUE, abs=0.1)


def test_transparency_becomes_white_and_16_bit_is_scaled(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 64, 32))
    rgba.save(tmp_path / "a_rgba.png")
    Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)).save(tmp_path / "b_grey16.png")  # 0.502 of full scale
    data = dataset(tmp_path)
    assert pixel(data[0], 10, 10) == pytest.approx(WHITE) and pixel(data[0], 50, 10) == pytest.approx(RED)
    assert pixel(data[1], 32, 32) == pytest.approx((0.0, 0.0, 0.0), abs=0.02)


def test_crops_and_flip(tmp_path):
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 32, 64))
    wide.save(tmp_path / "wide.png")
    assert pixel(dataset(tmp_path, crop="center")[0], 32, 2) == pytest.approx(BLUE)
    assert pixel(dataset(tmp_path, crop="none")[0], 32, 2) == pytest.approx(RED)
    flipped = PersonalizedBase(data_root=str(tmp_path), size=64, flip_p=1.0, crop="none")[0]
    assert pixel(flipped, 32, 61) == pytest.approx(RED)
    torch.manual_seed(0)
    corners = {pixel(dataset(tmp_path, crop="random")[0], 32, 2) for _ in range(20)}
    assert corners == {RED, BLUE}


def test_captions_templates_and_caption_files(tmp_path):
    solid("RGB").save(tmp_path / "a.jpg")
    solid("RGB").save(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("a {identifier} {class_word} on the beach\n")
    data = dataset(tmp_path, identifier="zwx", class_word="cat")
    assert data.captions == ["photo of a zwx cat", "a zwx cat on the beach"]
    assert dataset(tmp_path, reg=True, class_word="cat").captions[0] == "photo of a cat"
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"a\.txt.*empty"):
        dataset(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("a {identifer} dog", r"b\.txt: unknown placeholder \{identifer\} in 'a \{identifer\} dog'; the known ones are "
                          r"\{identifier\} and \{class_word\}"),
    ("a {identifier dog", r"b\.txt: unbalanced brace in 'a \{identifier dog'"),
    ("a identifier} dog", r"b\.txt: unbalanced brace"),
    ("a {{identifier}} dog", r"b\.txt: unbalanced brace"),
])
def test_unknown_placeholders_and_stray_braces_in_captions_are_errors(tmp_path, text, message):
    solid("RGB").save(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        dataset(tmp_path)


def test_a_template_with_an_unknown_placeholder_is_an_error(tmp_path):
    solid("RGB").save(tmp_path / "b.jpg")
    with pytest.raises(DataError, match=r"class images \(reg\): template: unknown placeholder \{class\}"):
        dataset(tmp_path, reg=True, template="a photo of a {class}")


def test_caption_files_lose_their_byte_order_mark_and_must_be_utf8(tmp_path):
    solid("RGB").save(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_bytes("\ufeffa {identifier} dog on the café terrace\n".encode("utf-8"))
    assert dataset(tmp_path).captions == ["a sks dog on the café terrace"]
    (tmp_path / "b.txt").write_bytes("a {identifier} dog on the café terrace\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"b\.txt: not UTF-8 text .*save it as UTF-8"):
        dataset(tmp_path)


def test_stray_files_are_skipped_with_a_warning(tmp_path, caplog):
    solid("RGB").save(tmp_path / "photo.jpg")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "notes.docx").write_bytes(b"PK")
    (tmp_path / "IMG_1.heic").write_bytes(b"\0")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        data = dataset(tmp_path)
    assert [p.name for p in data.paths] == ["photo.jpg"]
    assert "skipped 3 entries" in caplog.text and "notes.docx" in caplog.text and "HEIC" in caplog.text
    assert ".DS_Store" not in caplog.text


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    solid("RGB", (40, 90)).save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING):
        example = dataset(tmp_path)[0]
    assert example["image"].shape == (64, 64, 3)
    assert "smaller than 64 pixels" in caplog.text and "small.png" in caplog.text


@pytest.mark.parametrize("case", ["missing", "empty", "only_stray_files", "corrupt", "truncated", "not_a_folder"])
def test_bad_folders_name_the_path(tmp_path, case):
    folder = tmp_path / "photos"
    folder.mkdir()
    culprit = folder
    if case == "missing":
        folder.rmdir()
    elif case == "only_stray_files":
        (folder / "readme.md").write_text("hi")
        (folder / ".hidden.jpg").write_bytes(b"x")
    elif case == "corrupt":
        solid("RGB").save(folder / "good.jpg")
        culprit = folder / "broken.jpg"
        culprit.write_bytes(b"this is not a jpeg")
    elif case == "truncated":
        solid("RGB", (256, 256)).save(folder / "cut.jpg")
        culprit = folder / "cut.jpg"
        culprit.write_bytes(culprit.read_bytes()[:400])
    elif case == "not_a_folder":
        folder.rmdir()
        folder.write_text("")
    with pytest.raises(DataError) as error:
        dataset(folder)
    assert str(culprit) in str(error.value)


def test_bad_settings_are_refused(tmp_path):
    solid("RGB").save(tmp_path / "a.jpg")
    with pytest.raises(DataError, match="crop"):
        dataset(tmp_path, crop="middle")
    with pytest.raises(DataError, match="--reg_data_root"):
        PersonalizedBase(reg=True)
    with pytest.raises(TypeError, match="placeholder_token"):
        PersonalizedBase(data_root=str(tmp_path), placeholder_token="dog")


def folder_with(path, n: int):
    path.mkdir()
    for k in range(n):
        solid("RGB", color=(k * 40, 0, 0)).save(path / f"{k}.png")
    return str(path)


def data_config(instance: str, reg: str | None, num_class_images: int = 0) -> dict:
    common = {"size": 64, "flip_p": 0.0}
    return {"batch_size": 2, "num_class_images": num_class_images,
            "train": {"target": "ldm.data.personalized.PersonalizedBase",
                      "params": {**common, "data_root": instance, "repeats": 3}},
            "reg": None if reg is None else {"target": "ldm.data.personalized.PersonalizedBase",
                                             "params": {**common, "data_root": reg, "repeats": 1, "reg": True}}}


def test_pairs_follow_the_instance_set(tmp_path):
    module = DataModuleFromConfig(**data_config(folder_with(tmp_path / "i", 2), folder_with(tmp_path / "c", 5)))
    module.setup("fit")
    pairs = module.train_dataloader().dataset
    assert isinstance(pairs, ConceptPairs) and len(pairs) == 2 * 3
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == batch["class_image"].shape == (2, 64, 64, 3)
    assert batch["caption"] == ["photo of a sks dog"] * 2 and batch["class_caption"] == ["photo of a dog"] * 2


def test_without_reg_there_are_no_class_examples(tmp_path):
    module = DataModuleFromConfig(**data_config(folder_with(tmp_path / "i", 1), None))
    assert module.missing_class_images() == 0
    assert "class_image" not in next(iter(module.train_dataloader()))


def test_missing_class_images_are_counted_before_the_class_set_is_built(tmp_path):
    instance, reg = folder_with(tmp_path / "i", 1), str(tmp_path / "c")
    module = DataModuleFromConfig(**data_config(instance, reg, num_class_images=3))
    assert module.missing_class_images() == 3
    module.setup("fit")
    assert module.instance is not None and module.class_prior is None
    folder_with(tmp_path / "c", 3)
    assert module.missing_class_images() == 0
    module.setup("fit")
    assert len(module.class_prior.paths) == 3


@pytest.mark.parametrize("words, flag", [({"class_word": ""}, "--class_word"), ({"identifier": "  "}, "--token")])
def test_empty_class_word_or_identifier_is_refused(tmp_path, words, flag):
    solid("RGB").save(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=f"^{flag}.* is empty"):
        dataset(tmp_path, **words)


def test_the_same_folder_for_instance_and_class_images_is_refused(tmp_path):
    instance = folder_with(tmp_path / "photos", 2)
    module = DataModuleFromConfig(**data_config(instance, str(tmp_path / "x" / ".." / "photos")))
    with pytest.raises(DataError, match="--data_root and --reg_data_root are the same folder"):
        module.setup("fit")


def test_very_large_images_warn_in_one_line_and_refuse_above_pillows_limit(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # 12000 x 12000 photos, scaled down for the test
    solid("RGB", (80, 72)).save(tmp_path / "big.jpg")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own DecompressionBombWarning would fail here
        data = dataset(tmp_path)
        assert data[0]["image"].shape == (64, 64, 3)
    (message,) = [r.getMessage() for r in caplog.records if "very large" in r.getMessage()]
    assert "big.jpg: a very large image (80x72, 0 MP)" in message
    solid("RGB", (100, 90)).save(tmp_path / "huge.jpg")
    with pytest.raises(DataError, match=r"huge.jpg: the image is too large to decode safely \(0 MP, Pillow's limit"):
        dataset(tmp_path)


def test_caption_strategies_and_dropout(tmp_path):
    for name in ("{identifier}_{class_word}_on_the_beach_03.png", "a_{identifier}_{class_word} (2).png", "x.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    (tmp_path / "x.txt").write_text("a {identifier} {class_word} asleep\n")
    captions = {s: dataset(tmp_path, caption_strategy=s).captions for s in ("instanceprompt", "filename")}
    assert captions["instanceprompt"] == ["photo of a sks dog", "a sks dog asleep", "photo of a sks dog"]
    assert captions["filename"] == ["a sks dog", "x", "sks dog on the beach"]
    assert caption_from_filename(Path("IMG-0042.jpg")) == "IMG"
    with pytest.raises(DataError, match=r"caption_strategy textfile, but a_\{identifier\}_\{class_word\} \(2\).txt is "
                                        "missing beside it"):
        dataset(tmp_path, caption_strategy="textfile")
    with pytest.raises(DataError, match="caption_strategy must be one of instanceprompt, textfile, filename"):
        dataset(tmp_path, caption_strategy="tags")
    torch.manual_seed(0)
    dropped = [PersonalizedBase(data_root=str(tmp_path), size=64, repeats=100, caption_dropout=p)
               for p in (0.0, 0.3, 1.0)]
    empty = [sum(data[i]["caption"] == "" for i in range(len(data))) / len(data) for data in dropped]
    assert empty[0] == 0.0 and 0.2 < empty[1] < 0.4 and empty[2] == 1.0


def test_class_images_follow_their_prompt_negative_prompt_and_sampler(tmp_path):
    model = randomise_zero_init(build_tiny_model())
    plain = generate_class_images(model, tmp_path / "plain", "cat", 1, steps=2)
    steered = generate_class_images(model, tmp_path / "steered", "cat", 1, steps=2, prompt="{class_word} on grass",
                                    negative_prompt="blurry", sampler="euler_a")
    meta = read_metadata(steered[0])
    assert (meta["prompt"], meta["negative_prompt"], meta["sampler"]) == ("cat on grass", "blurry", "euler_a")
    assert read_metadata(plain[0])["prompt"] == "a photo of a cat"
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(steered[0])))
    with pytest.raises(UserError, match="--class_sampler 'fast': choose one of ddim, plms"):
        generate_class_images(model, tmp_path / "x", "cat", 1, sampler="fast")


def test_minimum_image_size_skips_small_photos(tmp_path, caplog):
    for name, size in (("big.png", (80, 70)), ("small.png", (40, 90))):
        Image.new("RGB", size).save(tmp_path / name)
    with caplog.at_level(logging.WARNING):
        data = dataset(tmp_path, minimum_image_size=64)
    assert [p.name for p in data.paths] == ["big.png"] and len(data.captions) == 1
    assert "skipped 1 images smaller than minimum_image_size 64 pixels: small.png" in caplog.text
    assert len(dataset(tmp_path).paths) == 2
    with pytest.raises(DataError, match="every image is smaller than minimum_image_size 100"):
        dataset(tmp_path, minimum_image_size=100)


def test_a_class_folder_of_stable_txt2img_is_read_from_its_samples_subfolder(tmp_path, caplog):
    instance, outdir = folder_with(tmp_path / "i", 1), tmp_path / "class_images" / "dog"
    outdir.mkdir(parents=True)
    samples = folder_with(outdir / "samples", 2)  # what `stable_txt2img.py --outdir class_images/dog` writes
    with caplog.at_level(logging.INFO, logger="ldm.data.personalized"):
        module = DataModuleFromConfig(**data_config(instance, str(outdir), num_class_images=3))
    assert [r.message for r in caplog.records if "samples/ subfolder" in r.message] == [
        f"class images: {outdir} holds no images, using its samples/ subfolder ({samples})"]
    assert module.class_image_jobs() == [(samples, "dog", 1)]  # --num_class_images writes where the reader reads
    folder_with(outdir / "samples" / "more", 1)
    Image.open(Path(samples) / "0.png").save(Path(samples) / "2.png")
    module.setup("fit")
    assert module.class_prior.paths[0].parent == Path(samples) and len(module.class_prior.paths) == 3


def test_a_class_folder_with_images_of_its_own_or_an_empty_samples_subfolder_is_read_itself(tmp_path):
    instance, own, empty = folder_with(tmp_path / "i", 1), folder_with(tmp_path / "own", 1), tmp_path / "empty"
    folder_with(tmp_path / "own" / "samples", 2)
    (empty / "samples").mkdir(parents=True)
    assert DataModuleFromConfig(**data_config(instance, own)).class_folder == own
    module = DataModuleFromConfig(**data_config(instance, str(empty), num_class_images=2))
    assert module.class_image_jobs() == [(str(empty), "dog", 2)]
