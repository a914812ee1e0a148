"""Several subjects in one run (`data.params.concepts`, repeated --data_root/--token) and several resolutions
(`data.params.resolutions`): which class images each subject's examples are paired with, batches of one size,
per-concept losses and the flags (a run of main.py: tests/e2e/test_concepts_e2e.py)."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.concepts import concept_configs, concepts_from_flags
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.image_files import DataError
from ldm.modules.losses import concept_losses
from tests.helpers.models import build_tiny_model

TINY = "configs/tiny/v1-finetune_unfrozen.yaml"
DATASET = "ldm.data.personalized.PersonalizedBase"


def solid_folder(folder: Path, colour: tuple[int, int, int], count: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (64 + 8 * k, 64), colour).save(folder / f"{k}.png")
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("concepts")
    return {"dog": solid_folder(root / "dog", (250, 0, 0), 2), "toy": solid_folder(root / "toy", (0, 250, 0), 3),
            "dogs": solid_folder(root / "dogs", (0, 0, 250), 2), "toys": solid_folder(root / "toys", (250, 250, 0), 2)}


def data_module(concepts, resolutions=None, batch_size=2, **train) -> DataModuleFromConfig:
    common = {"size": 32, "flip_p": 0.0}
    module = DataModuleFromConfig(
        batch_size=batch_size, concepts=concepts, resolutions=resolutions,
        train={"target": DATASET, "params": {**common, "repeats": 2, **train}},
        reg={"target": DATASET, "params": {**common, "repeats": 1, "reg": True}})
    module.setup("fit")
    return module


def two_subjects(folders, shared_class: bool = False) -> list[dict]:
    return [{"data_root": folders["dog"], "identifier": "sks", "class_word": "dog", "reg_data_root": folders["dogs"]},
            {"data_root": folders["toy"], "identifier": "zwx", "class_word": "dog" if shared_class else "toy",
             "reg_data_root": folders["dogs" if shared_class else "toys"], "repeats": 1}]


def colour_of(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in ((image.reshape(-1, 3).mean(0) + 1) * 127.5).round())


def test_each_subject_trains_with_its_own_captions_and_class_images(folders):
    data = data_module(two_subjects(folders))
    assert [c.name for c in data.concepts] == ["sks", "zwx"]
    assert set(data.datasets()) == {"train/sks", "reg/sks", "train/zwx", "reg/zwx"}
    pairs = data.train_dataloader().dataset
    assert len(pairs) == 2 * 2 + 3 * 1  # each subject's photos times its own repeats
    expected = {"sks": ("photo of a sks dog", "photo of a dog", (250, 0, 0), (0, 0, 250)),
                "zwx": ("photo of a zwx toy", "photo of a toy", (0, 250, 0), (250, 250, 0))}
    for index in range(len(pairs)):
        item = pairs[index]
        caption, class_caption, colour, class_colour = expected[item["concept"]]
        assert (item["caption"], item["class_caption"]) == (caption, class_caption)
        assert colour_of(item["image"]) == colour and colour_of(item["class_image"]) == class_colour
    batch = next(iter(data.train_dataloader()))
    assert len(batch["concept"]) == 2 and batch["image"].shape == (2, 32, 32, 3)


def test_subjects_of_one_class_folder_share_its_class_set(folders):
    data = data_module(two_subjects(folders, shared_class=True))
    assert data.concepts[0].class_prior is data.concepts[1].class_prior
    assert set(data.datasets()) == {"train/sks", "reg/sks", "train/zwx"}
    assert data.class_folders() == {folders["dogs"]: "dog"}


def test_several_resolutions_give_batches_of_one_size(folders):
    data = data_module(two_subjects(folders)[:1], resolutions=[32, 48], batch_size=3)
    assert [c.name for c in data.concepts] == ["sks@32", "sks@48"]
    assert [c.instance.size for c in data.concepts] == [32, 48] and data.concepts[1].class_prior.size == 48
    sizes = []
    for batch in data.train_dataloader():
        assert batch["image"].shape[1:3] == batch["class_image"].shape[1:3]
        sizes.append(batch["image"].shape[1])
    assert sorted(sizes) == [32, 32, 48, 48]  # 4 examples at each size, in batches of at most 3
    with pytest.raises(DataError, match="distinct sizes"):
        data_module(two_subjects(folders)[:1], resolutions=[32, 32])


def test_a_single_subject_is_the_original_pairing(folders):
    single = DataModuleFromConfig(batch_size=1, train={"target": DATASET, "params": {
        "data_root": folders["dog"], "size": 32, "repeats": 2, "flip_p": 0.0}}, reg={"target": DATASET, "params": {
            "data_root": folders["dogs"], "size": 32, "repeats": 1, "reg": True}})
    single.setup("fit")
    pairs = single.train_dataloader().dataset
    assert set(single.datasets()) == {"train", "reg"} and "concept" not in pairs[0]
    assert colour_of(pairs[3]["class_image"]) == colour_of(single.class_prior.image(1))  # index 3 % 2 class images


def test_concept_config_mistakes_are_named(folders):
    train = {"target": DATASET, "params": {"size": 32}}
    reg = {"target": DATASET, "params": {"size": 32, "reg": True}}
    for concepts, message in (([], "is empty"),
                              ([{"data_root": "a", "reg_data_root": "b", "token": "x"}], "unknown keys"),
                              ([{"identifier": "x", "reg_data_root": "b"}], "has no data_root"),
                              ([{"data_root": "a", "identifier": "x"}], "has no reg_data_root"),
                              ([{"data_root": "a", "identifier": "x", "reg_data_root": "b"},
                                {"data_root": "c", "identifier": "x", "reg_data_root": "b"}], "names repeat"),
                              ([{"data_root": "a", "identifier": "x", "reg_data_root": "b"},
                                {"data_root": "./a/", "identifier": "y", "reg_data_root": "b"}],
                               r"concepts\[0\] and \[1\] train on the same photos \(./a/; --data_root given twice\?\)")):
        with pytest.raises(DataError, match=message):
            concept_configs(train, reg, concepts)
    assert len(concept_configs(train, None, [{"data_root": "a", "identifier": "x"}])) == 1  # no class images needed


def test_repeated_flags_make_the_concept_list():
    flags = {"data_root": ["a", "b"], "identifier": ["sks", "zwx"], "class_word": ["dog"],
             "reg_data_root": ["dogs", "toys"]}
    assert concepts_from_flags(flags) == [
        {"data_root": "a", "identifier": "sks", "class_word": "dog", "reg_data_root": "dogs"},
        {"data_root": "b", "identifier": "zwx", "class_word": "dog", "reg_data_root": "toys"}]
    with pytest.raises(DataError, match="need as many identifiers"):
        concepts_from_flags({**flags, "identifier": ["sks"]})
    with pytest.raises(DataError, match="given 3 times for 2 subjects"):
        concepts_from_flags({**flags, "class_word": ["a", "b", "c"]})


def test_the_loss_of_each_concept_is_the_mean_of_its_examples():
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0])  # three instance examples, then one class example
    losses = concept_losses(per_sample, ["sks", "zwx", "sks"])
    assert losses == {"loss_instance_sks": 2.5, "loss_instance_zwx": 2.0}
    assert concept_losses(per_sample, None) == {}
    model = build_tiny_model()
    key, caption = model.first_stage_key, model.cond_stage_key
    batch = {key: torch.rand(2, 64, 64, 3) * 2 - 1, caption: ["photo of a sks dog", "photo of a zwx toy"],
             "concept": ["sks", "zwx"]}
    t, noise = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    losses = model.shared_step(batch, t, noise)
    torch.manual_seed(0)
    per_sample, _ = model.per_sample_losses(batch, t, noise)
    assert torch.equal(losses["loss_instance_sks"], per_sample[0]) and torch.equal(losses["loss_instance_zwx"],
                                                                                     per_sample[1])
