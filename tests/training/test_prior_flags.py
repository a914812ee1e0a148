"""`--prior frozen_model` in the run's config: no class dataset, no class images to generate, class prompts in every
batch, and a full fine-tune's base checkpoint recorded for the resume; `--prior class_images` (the default) changes
nothing."""
import logging

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.batch import PRIOR_CAPTION_KEY
from ldm.data.datamodule import DataModuleFromConfig
from tests.helpers.repo import REPO, load_script

FINETUNE = REPO / "configs" / "tiny" / "v1-finetune_unfrozen.yaml"
LORA = REPO / "configs" / "tiny" / "v1-finetune_lora.yaml"


@pytest.fixture(scope="module")
def main():
    return load_script("dreambooth_main_prior", REPO / "main.py")


def configured(main, base, *args: str):
    config = OmegaConf.load(base)
    opt = main.get_parser().parse_args(["--base", str(base), "-t", "--actual_resume", "base.ckpt", *args])
    main.apply_flags(config, opt)
    return config


def test_frozen_model_drops_the_class_images_and_records_the_base(main, caplog):
    with caplog.at_level(logging.INFO):
        config = configured(main, FINETUNE, "--prior", "frozen_model", "--reg_data_root", "classes/dog",
                            "--num_class_images", "50", "--use_ema_weights")
    params, data = config.model.params, config.data.params
    assert params.prior_preservation == "frozen_model"
    assert data.reg is None and data.num_class_images == 0 and data.prior_captions is True
    assert params.prior_base_checkpoint == "base.ckpt" and params.prior_base_ema is True
    assert "the class images in classes/dog are not used" in caplog.text
    assert "no class images are generated (num_class_images 50" in caplog.text


def test_a_lora_run_needs_no_base_for_its_frozen_model_and_class_images_is_the_default(main):
    lora = configured(main, LORA, "--prior", "frozen_model")
    assert lora.data.params.reg is None and "prior_base_checkpoint" not in lora.model.params
    plain = configured(main, FINETUNE, "--reg_data_root", "classes/dog")
    expected = OmegaConf.load(FINETUNE)
    assert "prior_preservation" not in plain.model.params and "prior_captions" not in plain.data.params
    assert plain.data.params.reg.params.data_root == "classes/dog"
    assert plain.model.params == expected.model.params


def test_each_instance_example_carries_its_class_prompt(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64), (200, 60, 40)).save(tmp_path / "photos" / "a.png")
    train = {"target": "ldm.data.personalized.PersonalizedBase",
             "params": {"size": 64, "data_root": str(tmp_path / "photos"), "class_word": "cat", "repeats": 2}}
    for class_prompt, expected in ((None, "photo of a cat"), ("a {class_word} on a sofa", "a cat on a sofa")):
        data = DataModuleFromConfig(batch_size=2, train=train, prior_captions=True, class_prompt=class_prompt)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        assert batch[PRIOR_CAPTION_KEY] == [expected] * 2 and batch["caption"] == ["photo of a sks cat"] * 2
        assert not any(key.startswith("class_") for key in batch)
    plain = DataModuleFromConfig(batch_size=2, train=train)
    plain.setup("fit")
    assert PRIOR_CAPTION_KEY not in next(iter(plain.train_dataloader()))
