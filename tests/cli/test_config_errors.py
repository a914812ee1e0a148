"""main.py ends every config mistake in one line naming the key, the value and what was expected, before training:
unknown keys, values of the wrong type, values a constructor refuses, unwritable class-image folders."""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.repo import REPO

TINY = str(REPO / "configs" / "tiny" / "v1-finetune_unfrozen.yaml")


@pytest.fixture(scope="module")
def main_module():
    spec = importlib.util.spec_from_file_location("dreambooth_main", REPO / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    for name in ("photos", "class"):
        (root / name).mkdir()
        Image.new("RGB", (64, 64), (200, 60, 40)).save(root / name / "a.png")
    return root / "photos", root / "class"


def run(main_module, tmp_path, tiny_ckpt, folders, *extra: str, reg: str = "") -> tuple[int, list[str]]:
    photos, class_images = folders
    args = ["--base", TINY, "-t", "--actual_resume", str(tiny_ckpt), "--accelerator", "cpu", "--data_root",
            str(photos), "--reg_data_root", reg or str(class_images), "-l", str(tmp_path / "logs"), *extra]
    return main_module.main(args), args


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("extra, expected", [
    (["model.params.use_ema=true", "model.params.ema_decay=1.5"], "EMA decay must be between 0 and 1, got 1.5"),
    (["--precision", "foo"], "Precision 'foo' is invalid"),
    (["lightning.modelcheckpoint.params.keep_last_n=0"], "keep_last_n >= 1 or null"),
])
def test_values_a_constructor_refuses_are_one_line(main_module, tmp_path, tiny_ckpt, folders, capsys, extra, expected):
    status, _ = run(main_module, tmp_path, tiny_ckpt, folders, "--max_steps", "1", *extra)
    assert status == 1 and expected in one_line(capsys)
    assert not any((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))


def test_class_images_with_nowhere_to_go_are_one_line(main_module, tmp_path, tiny_ckpt, folders, capsys):
    status, _ = run(main_module, tmp_path, tiny_ckpt, folders, "--num_class_images", "2",
                    reg="/sys/dreambooth-class-images")
    assert status == 1 and "--reg_data_root /sys/dreambooth-class-images" in one_line(capsys)


@pytest.mark.parametrize("override, expected", [
    ("modle.base_learning_rate=1e-3", "config key modle is unknown (known here: model, data, lightning)"),
    ("lightning.trainr.max_steps=3", "config key lightning.trainr is unknown"),
    ("model.base_learning_rate=abc", "config model.base_learning_rate = 'abc': expected float"),
    ("data.params.batch_size=two", "config data.params.batch_size = 'two': expected int"),
    ("model.params.unet_config.params.model_channels=1.5",
     "config model.params.unet_config.params.model_channels = 1.5: expected int"),
    ("model.params.use_ema=maybe", "config model.params.use_ema = 'maybe': expected bool"),
    ("model.params.unet_config.params.num_res_blockz=2",
     "config key model.params.unet_config.params.num_res_blockz is unknown to"),
    ("model.base_learning_rate=${nowhere}", "Interpolation key 'nowhere' not found"),
    ("lightning.callbacks.image_logger.params.batch_frequency=often",
     "config lightning.callbacks.image_logger.params.batch_frequency = 'often': expected int"),
])
def test_unknown_keys_and_wrong_types_are_one_line_naming_the_key(main_module, tmp_path, tiny_ckpt, folders, capsys,
                                                                  override, expected):
    status, _ = run(main_module, tmp_path, tiny_ckpt, folders, override)
    line = one_line(capsys)
    assert status == 1 and expected in line, line
    assert not (tmp_path / "logs").exists()


def test_an_unknown_top_level_key_in_a_yaml_file_is_refused(main_module, tmp_path, tiny_ckpt, folders, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  params:\n    batch_size: 1\nmodle:\n  base_learning_rate: 1.0e-3\n")
    status, _ = run(main_module, tmp_path, tiny_ckpt, folders, "--base", TINY, str(extra))
    assert status == 1 and "config key modle is unknown" in one_line(capsys)
