"""End to end: `main.py` fine-tunes the tiny config in a subprocess on photos made here, then the test checks what it
wrote (checkpoints, images, metrics, generated class images), resuming, Ctrl-C/SIGTERM, a NaN loss and bad inputs."""
import csv
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, build_tiny_model
from ldm.callbacks import AtomicCheckpointIO, StepCheckpoint
from ldm.checkpoint import CheckpointError, save_weights
from ldm.inference import read_metadata

TINY = "configs/tiny/v1-finetune_unfrozen.yaml"
# One thread per process: on a few shared cores, PyTorch's default threads make the tiny model many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_photos(folder: Path) -> Path:
    """Instance photos as users have them: JPEG and PNG of odd sizes, one EXIF-rotated, one RGBA."""
    folder.mkdir(parents=True)
    Image.new("RGB", (97, 71), (200, 60, 40)).save(folder / "dog1.jpg", quality=90)
    Image.new("RGB", (100, 64), (40, 160, 60)).save(folder / "dog2.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (90, 66), (30, 30, 200)).save(folder / "IMG_0003.JPG", exif=exif)
    Image.new("RGBA", (70, 70), (250, 200, 0, 128)).save(folder / "dog4.png")
    return folder


def make_class_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for k in range(n):
        Image.new("RGB", (64, 64), (k * 60, 90, 90)).save(folder / f"real-{k}.png")
    return folder


def run_main(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def fresh_run_args(ckpt: Path, instance: Path, reg: Path, logdir: Path, *extra: str) -> list[str]:
    return ["--base", TINY, "-t", "--actual_resume", str(ckpt), "-n", "job", "--accelerator", "cpu",
            "--data_root", str(instance), "--reg_data_root", str(reg), "--class_word", "dog", "-l", str(logdir), *extra]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos") / "instance")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_ckpt, photos) -> SimpleNamespace:
    """4 steps with checkpoints every 2; the class folder holds 3 images and 5 are asked for, so 2 are generated."""
    root = tmp_path_factory.mktemp("e2e")
    reg = make_class_images(root / "class", 3)
    started = time.monotonic()
    proc = run_main(*fresh_run_args(tiny_ckpt, photos, reg, root / "logs", "--num_class_images", "5",
                                    "--safetensors"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run,) = (root / "logs").iterdir()
    return SimpleNamespace(dir=run, reg=reg, proc=proc, seconds=time.monotonic() - started)


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def test_checkpoints_at_the_configured_steps_and_at_the_end(first_run):
    folder = first_run.dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt", "last.safetensors", "step_2.ckpt", "step_2.safetensors", "step_4.ckpt", "step_4.safetensors"]
    model_keys = set(build_tiny_model().state_dict())
    step = torch.load(folder / "step_2.ckpt", map_location="cpu")  # torch's default: weights_only=True
    assert set(step) == {"state_dict"} and set(step["state_dict"]) == model_keys
    last = torch.load(folder / "last.ckpt", map_location="cpu")
    assert last["global_step"] == 4 and last["optimizer_states"] and set(last["state_dict"]) == model_keys
    shared = load_file(folder / "last.safetensors")
    assert set(shared) == model_keys
    assert shared["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert (folder / "step_2.ckpt").stat().st_size < (folder / "last.ckpt").stat().st_size / 2


def test_run_folder_has_configs_images_and_both_loss_terms(first_run, photos):
    configs = sorted(p.name for p in (first_run.dir / "configs").iterdir())
    assert len(configs) == 2 and configs[0].endswith("-lightning.yaml") and configs[1].endswith("-project.yaml")
    project = (first_run.dir / "configs" / configs[1]).read_text()
    assert str(photos) in project and "class_word: dog" in project
    images = {p.name.split("_e-")[0] for p in (first_run.dir / "images" / "train").iterdir()}
    assert {f"{kind}_gs-00000{step}" for kind in ("samples_instance", "samples_class", "inputs")
            for step in (2, 4)} <= images
    grid = next((first_run.dir / "images" / "train").glob("samples_instance_gs-000002_*.png"))
    assert read_metadata(grid)["prompt"] == "photo of a sks dog"
    rows = metrics(first_run.dir)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for row in rows:
        terms = [float(row[k]) for k in ("train/loss", "train/loss_instance", "train/loss_class", "train/lr")]
        assert all(math.isfinite(v) for v in terms)
        assert terms[0] == pytest.approx(terms[1] + terms[2], rel=1e-5)  # reg_weight 1.0


def test_missing_class_images_were_generated(first_run):
    generated = sorted(first_run.reg.glob("class-*.png"))
    assert [p.name for p in generated] == ["class-00000.png", "class-00001.png"]
    metadata = read_metadata(generated[0])
    assert (metadata["prompt"], metadata["sampler"], metadata["steps"], metadata["scale"]) == (
        "a photo of a dog", "ddim", 50, 10.0)
    assert not list(first_run.reg.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("name", ["step_2.ckpt", "last.ckpt", "last.safetensors"])
def test_checkpoints_load_in_txt2img(first_run, tmp_path, name):
    txt2img = load_script("stable_txt2img", REPO / "scripts" / "stable_txt2img.py")
    status = txt2img.main(["--ckpt", str(first_run.dir / "checkpoints" / name), "--config",
                           "configs/tiny/v1-inference.yaml", "--H", "64", "--W", "64", "--ddim_steps", "2",
                           "--n_samples", "1", "--n_iter", "1", "--device", "cpu", "--outdir", str(tmp_path),
                           "--prompt", "photo of a sks dog"])
    assert status == 0 and list((tmp_path / "samples").glob("*.png"))


def test_resume_continues_from_the_saved_step(first_run, tmp_path):
    run = copy_of(first_run.dir, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    proc = run_main("-r", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last.read_bytes() == before and not (run / "checkpoints" / "step_6.ckpt").exists()  # same max_steps

    proc = run_main("-r", str(run), "--max_steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step_6.ckpt").is_file()
    resumed = torch.load(last, map_location="cpu")
    assert resumed["global_step"] == 6
    assert int(resumed["optimizer_states"][0]["state"][0]["step"]) == 6  # Adam's moments carried on from step 4
    assert [int(r["step"]) for r in metrics(run)] == [0, 1, 2, 3, 4, 5]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(first_run, tmp_path):
    run = copy_of(first_run.dir, tmp_path)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    proc = run_main("-r", str(run), "--max_steps", "8", "model.params.reg_weight=.nan")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: loss is nan at step 4")
    assert "Traceback" not in proc.stderr and "last good checkpoint" in proc.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not (run / "checkpoints" / "step_6.ckpt").exists()


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_last_ckpt(tmp_path, tiny_ckpt, photos, signum, status):
    reg = make_class_images(tmp_path / "class", 2)
    args = fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs", "--max_steps", "100000",
                          "lightning.callbacks.image_logger.params.disabled=true")
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("logs/*/checkpoints/step_2.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr[-3000:]
    (last,) = tmp_path.glob("logs/*/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu")["global_step"] >= 2
    assert "Resume with: python main.py -t -r" in stdout


@pytest.fixture(scope="module")
def main_module():
    return load_script("dreambooth_main", REPO / "main.py")


def test_corrupt_photo_fails_before_the_model_and_writes_nothing(main_module, tmp_path, photos, tiny_ckpt, capsys):
    instance = Path(shutil.copytree(photos, tmp_path / "instance"))
    (instance / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    reg = make_class_images(tmp_path / "class", 1)
    status = main_module.main(fresh_run_args(tiny_ckpt, instance, reg, tmp_path / "logs"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and str(instance / "broken.jpg") in lines[0]
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("change, message", [
    ({"instance": "missing"}, "folder not found"),
    ({"reg": "empty"}, "no images to train on"),
    ({"ckpt": "missing"}, "checkpoint not found"),
    ({"args": ["data.params.train.params.placeholder_token=dog"]}, "unexpected keyword argument 'placeholder_token'"),
    ({"args": ["--gpus", "0,"]}, "--accelerator cpu"),
])
def test_user_errors_are_one_line_and_write_nothing(main_module, tmp_path, photos, tiny_ckpt, capsys, monkeypatch,
                                                    change, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    instance = tmp_path / "nowhere" if change.get("instance") else photos
    reg = tmp_path / "class"
    reg.mkdir()
    if not change.get("reg"):
        make_class_images(reg / "ok", 1)
        reg = reg / "ok"
    ckpt = tmp_path / "missing.ckpt" if change.get("ckpt") else tiny_ckpt
    args = [a for a in fresh_run_args(ckpt, instance, reg, tmp_path / "logs") if a not in ("--accelerator", "cpu")]
    status = main_module.main(args + change.get("args", []))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "logs").exists()


def test_weights_only_files_cannot_resume(tmp_path, tiny_model):
    path = tmp_path / "step_2.ckpt"
    save_weights(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="weights only.*--actual_resume"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_weights_that_are_not_finite_are_never_written(tmp_path):
    model = build_tiny_model()
    callback = StepCheckpoint(str(tmp_path), every_n_train_steps=1)
    trainer = SimpleNamespace(is_global_zero=True, global_step=3)
    callback.save_weights(trainer, model, tmp_path / "step_3.ckpt")
    with torch.no_grad():
        next(model.model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="step_5.ckpt was not written; the last good checkpoint is"):
        callback.save_weights(trainer, model, tmp_path / "step_5.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3.ckpt"]


def key_paths(node, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(key_paths(value, f"{prefix}.{key}") for key, value in node.items()))


def test_full_config_keeps_the_original_values_and_its_tiny_twin_the_same_keys():
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    full = OmegaConf.load(REPO / "configs/stable-diffusion/v1-finetune_unfrozen.yaml")
    tiny = OmegaConf.load(REPO / TINY)
    text_config = ".model.params.cond_stage_config.params"  # the tiny text encoder's sizes, absent from the full one
    assert key_paths(OmegaConf.to_container(full)) == {
        k for k in key_paths(OmegaConf.to_container(tiny)) if not k.startswith(text_config)}
    data, lightning = full.data.params, full.lightning
    assert (full.model.base_learning_rate, full.model.params.reg_weight, data.batch_size) == (1.0e-6, 1.0, 1)
    assert (data.train.params.size, data.train.params.repeats, data.reg.params.repeats) == (512, 100, 10)
    assert data.train.params.flip_p == data.reg.params.flip_p == 0.5
    assert (lightning.modelcheckpoint.params.every_n_train_steps, lightning.trainer.max_steps,
            lightning.callbacks.image_logger.params.batch_frequency) == (500, 800, 500)
    with torch.device("meta"):
        model = instantiate_from_config(full.model)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trainable for p in model.cond_stage_model.parameters())  # the text encoder trains too
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert isinstance(instantiate_from_config(lightning.callbacks.image_logger), pl.Callback)
    assert instantiate_from_config(full.data).missing_class_images() == 0  # generating class images is opt-in


def test_flags_go_into_the_config_that_the_run_saves(main_module, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    opt = main_module.get_parser().parse_args([
        "--base", TINY, "-t", "--data_root", "p", "--reg_data_root", "c", "--class_word", "cat", "--token", "zwx",
        "--max_steps", "7", "--num_class_images", "9", "--freeze_text_encoder", "--safetensors", "--gpus", "0,1",
        "--precision", "bf16-mixed"])
    config = main_module.load_config([str(REPO / TINY)], ["model.params.reg_weight=0.5"])
    main_module.apply_flags(config, opt)
    train, reg = config.data.params.train.params, config.data.params.reg.params
    assert (train.data_root, reg.data_root, train.class_word, reg.class_word, train.identifier) == (
        "p", "c", "cat", "cat", "zwx")
    assert (config.data.params.num_class_images, config.model.params.cond_stage_trainable,
            config.model.params.reg_weight) == (9, False, 0.5)
    assert config.lightning.modelcheckpoint.params.safetensors is True
    options = main_module.trainer_options(config.lightning.trainer, opt)
    assert options == {"benchmark": True, "max_steps": 7, "log_every_n_steps": 1, "accelerator": "gpu",
                       "devices": [0, 1], "precision": "bf16-mixed"}
    assert [main_module.parse_gpus(text) for text in ("0,", "1", "0,1", "-1")] == [[0], 1, [0, 1], -1]
