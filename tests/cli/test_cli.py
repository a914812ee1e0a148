"""Every command line ends a user error in one `error:` line (ldm.cli.run_command), and a bug keeps its traceback."""
import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm.cli import run_command
from ldm.util import UserError
from tests.helpers.repo import REPO, TINY_CONFIG, load_script

UNWRITABLE = Path("/sys")  # not writable by anyone, root included (tests may run as root, for whom chmod is no bar)


def error_lines(capsys) -> list[str]:
    """The lines a command wrote to stderr, checked to be one `error:` line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO:", "WARNING:"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines


@pytest.mark.parametrize("error, expected", [
    (UserError("bad flag"), "error: bad flag"),
    (CheckpointError("not a checkpoint"), "error: not a checkpoint"),
    (PermissionError(13, "Permission denied", "/out/x.ckpt"), "error: /out/x.ckpt: Permission denied"),
    (OSError("folder has no file named\n  model.safetensors"), "error: folder has no file named model.safetensors"),
    (json.JSONDecodeError("Expecting value", "{", 1), "error: malformed JSON (Expecting value: line 1 column 2"),
])
def test_user_errors_are_one_line_and_status_1(capsys, error, expected):
    def work():
        raise error
    assert run_command(work, level=logging.WARNING) == 1
    assert error_lines(capsys)[0].startswith(expected)


def test_a_bug_keeps_its_traceback_and_results_are_printed_or_returned(capsys):
    def bug():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        run_command(bug)
    assert run_command(lambda: "done") == 0 and capsys.readouterr().out == "done\n"
    assert run_command(lambda: 143) == 143


def test_ctrl_c_is_status_130(capsys):
    def interrupted():
        raise KeyboardInterrupt
    assert run_command(interrupted) == 130 and "interrupted" in capsys.readouterr().err


def bad_path_args(tmp_path: Path) -> dict[str, list[str]]:
    """For each script, a command line with a path the user got wrong (missing, or below a file)."""
    missing, a_file = tmp_path / "missing.ckpt", tmp_path / "file"
    a_file.write_text("")
    return {
        "stable_txt2img": ["--ckpt", str(missing), "--config", str(TINY_CONFIG), "--outdir", str(tmp_path / "o")],
        "img2img": ["--ckpt", str(missing), "--config", str(TINY_CONFIG), "--init-img", str(tmp_path / "no.png"),
                    "--outdir", str(tmp_path / "o")],
        "merge_lora": [str(missing), str(tmp_path / "no.safetensors"), "-o", str(tmp_path / "x.safetensors")],
        "extract_lora": [str(missing), "--base", str(missing), "-o", str(tmp_path / "x.safetensors"), "--rank", "4"],
        "prune_ckpt": [str(missing), "-o", str(tmp_path / "x.ckpt")],
        "convert_sd_to_diffusers": [str(missing), "-o", str(tmp_path / "out")],
        "convert_diffusers_to_sd": [str(missing), "-o", str(tmp_path / "x.safetensors")],
        "make_masks": ["--input_dir", str(tmp_path / "no-photos"), "--text", "dog"],
        "evaluate": ["--model", str(missing), "--photos", str(tmp_path / "no-photos"), "--class_word", "dog"],
        "compare": ["--model", str(missing)],
        "find_rare_token": ["--ckpt", str(missing)],
        "make_toy_subject": ["--output_dir", str(a_file / "subject")],
        "build_clip_tokenizer": [str(tmp_path / "missing.txt.gz"), "--out", str(tmp_path / "tok")],
        "pretrain_toy_model": ["--workdir", str(a_file / "work"), "--data_dir", str(tmp_path / "data")],
        "toy_demo": ["--base", str(missing), "--outdir", str(tmp_path / "demo")],
        "toy_sweep": ["--base", str(missing), "--outdir", str(tmp_path / "sweep")],
        "toy_methods": ["--base", str(missing), "--outdir", str(tmp_path / "methods")],
        "benchmarks/train": ["--config", str(tmp_path / "missing.yaml"), "--workdir", str(tmp_path / "w")],
        "benchmarks/optimizers": ["--config", str(tmp_path / "missing.yaml")],
        "benchmarks/sampling": ["--config", str(tmp_path / "missing.yaml")],
        "gpu_check": ["--tiny", "--device", "cpu", "--stages", "env", "--workdir", str(a_file / "work")],
    }


def test_every_script_is_covered_below(tmp_path):
    scripts = {path.stem for path in (REPO / "scripts").glob("*.py") if path.stem != "__init__"}
    scripts |= {f"benchmarks/{path.stem}" for path in (REPO / "scripts" / "benchmarks").glob("*.py")
                if "def main(" in path.read_text()}
    assert scripts == set(BAD_PATH_SCRIPTS) == set(bad_path_args(tmp_path))


BAD_PATH_SCRIPTS = ("stable_txt2img", "img2img", "merge_lora", "extract_lora", "prune_ckpt", "convert_sd_to_diffusers",
                    "convert_diffusers_to_sd", "make_masks", "evaluate", "compare", "find_rare_token",
                    "make_toy_subject", "build_clip_tokenizer", "pretrain_toy_model", "toy_demo", "toy_sweep",
                    "toy_methods", "benchmarks/train", "benchmarks/optimizers", "benchmarks/sampling", "gpu_check")


@pytest.mark.parametrize("name", BAD_PATH_SCRIPTS)
def test_every_script_ends_a_bad_path_in_one_error_line_naming_its_own_flags(tmp_path, capsys, name):
    script = load_script(name)
    with pytest.raises(SystemExit):
        script.main(["--help"])
    options = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
    status = script.main(bad_path_args(tmp_path)[name])
    line = error_lines(capsys)[0]
    assert status == 1
    assert set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", line)) <= options, line  # no flag of another command


def test_an_unwritable_output_is_one_line_before_any_weights_are_read(tmp_path, tiny_ckpt, capsys):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    lora = tmp_path / "lora.safetensors"
    for name, args in [("convert_diffusers_to_sd", [str(pipeline), "-o", str(UNWRITABLE / "out" / "x.safetensors")]),
                       ("convert_sd_to_diffusers", [str(tiny_ckpt), "-o", str(UNWRITABLE / "out"), "--config",
                                                    str(TINY_CONFIG)]),
                       ("merge_lora", [str(tiny_ckpt), str(lora), "-o", str(UNWRITABLE / "x.safetensors")]),
                       ("extract_lora", [str(tiny_ckpt), "--base", str(tiny_ckpt), "-o",
                                         str(UNWRITABLE / "x.safetensors"), "--rank", "4"]),
                       ("prune_ckpt", [str(tiny_ckpt), "-o", str(UNWRITABLE / "x.ckpt")])]:
        assert load_script(name).main(args) == 1, name
        line = error_lines(capsys)[0]
        assert line.startswith(f"error: -o {UNWRITABLE}") and "is not writable" in line, line


def test_a_malformed_diffusers_config_is_one_line_naming_it(tmp_path, capsys):
    folder = tmp_path / "pipeline"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text('{"_class_name": "UNet2D' if part == "unet" else "{}")
    (folder / "model_index.json").write_text("{}")
    assert load_script("convert_diffusers_to_sd").main([str(folder), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert f"{folder / 'unet' / 'config.json'}: malformed JSON" in error_lines(capsys)[0]


def test_a_model_folder_with_a_config_but_no_weights_is_one_line(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32)).save(photos / "dog.png")
    for name in ("clipseg", "clip", "dino"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert load_script("make_masks").main(["--input_dir", str(photos), "--text", "dog", "--clipseg",
                                           str(tmp_path / "clipseg")]) == 1
    assert "has a config.json but no weights" in error_lines(capsys)[0]
    assert load_script("evaluate").main(["--model", "x.ckpt", "--photos", str(photos), "--class_word", "dog",
                                         "--clip", str(tmp_path / "clip"), "--dino", str(tmp_path / "dino")]) == 1
    assert "--clip" in error_lines(capsys)[0]
