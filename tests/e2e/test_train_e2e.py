"""End to end: `main.py` fine-tunes the tiny config in a subprocess on photos made here, then the test checks what it
wrote (checkpoints, images, metrics, generated class images), resuming, Ctrl-C/SIGTERM, a NaN loss and bad inputs."""
import errno
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.callbacks import AtomicCheckpointIO, StepCheckpoint
from ldm.checkpoint import CheckpointError, save_weights
from ldm.images import read_metadata
from ldm.util import instantiate_from_config
from tests.helpers.models import build_tiny_model
from tests.helpers.other_tools import check_a1111_ckpt, parse_infotext
from tests.helpers.repo import REPO, load_script
from tests.helpers.runs import ENV, TINY, fresh_run_args, make_class_images, make_photos, metrics, run_main

pytestmark = pytest.mark.e2e


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


def test_the_run_ends_with_its_loss_plot(first_run):
    plot = first_run.dir / "loss.png"
    assert plot.is_file() and Image.open(plot).size == (960, 480)


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
    for name in ("step_2.ckpt", "last.ckpt"):
        check_a1111_ckpt(folder / name)  # the web UI's safe-unpickle rule
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~mask}


def test_last_ckpt_is_written_with_every_step_checkpoint(first_run):
    """A kill -9 after step 2 would find a resumable last.ckpt of step 2, not only weights-only step files."""
    saved = [line.split("saved ")[1] for line in first_run.proc.stderr.splitlines() if ": saved " in line]
    folder = first_run.dir / "checkpoints"
    assert saved == [str(folder / n) for n in ("step_2.ckpt", "last.ckpt", "step_4.ckpt", "last.ckpt")]


def test_progress_in_steps_and_a_summary_without_lightning_noise(first_run):
    err = first_run.proc.stderr
    assert [line.split("INFO: ")[1].split(" ·")[0] for line in err.splitlines() if " · loss " in line] == [
        "step 1/4", "step 2/4", "step 3/4", "step 4/4"]  # log_every_n_steps 1, and not a terminal: plain lines
    assert re.search(r"step 2/4 · loss \d+\.\d{3} · \d+\.\d s/step · ETA \d+:\d\d", err)
    for noise in ("Epoch 0", "v_num", "💡", "litlogger", "LeafSpec", "GPU available", "`Trainer.fit` stopped",
                  "Name  ", "Traceback"):
        assert noise not in err + first_run.proc.stdout, noise
    run, last = first_run.dir, first_run.dir / "checkpoints" / "last.ckpt"
    summary = err[err.index("INFO: summary: "):]
    assert re.match(r"INFO: summary: steps 0 to 4 \(4 in this session\) in \d+:\d\d, [\d.]+ s/step; mean loss of the "
                    r"last 4 steps \d\.\d{4}; peak memory [\d.]+ [kMG]B \(process peak RSS\)", summary)
    assert f"checkpoints: {last} (resumable), step_2.ckpt, step_4.ckpt" in summary
    assert f"sample grids (step 4): {run}/images/train/samples_class_gs-000004_" in summary
    (config,) = run.glob("configs/*-project.yaml")
    command = summary.split("sample from it: ")[1].strip()
    assert command == (f"python scripts/stable_txt2img.py --ckpt {last} --config {config} "
                       '--prompt "photo of a sks dog"')


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
    info = parse_infotext(Image.open(grid).text["parameters"])
    assert (info["Prompt"], info["Sampler"], info["Size"], info["Training step"]) == (
        "photo of a sks dog", "DDIM", "64x64", "2")
    width, height = Image.open(grid).size  # 2 samples of 64 px in a row, a label column, a title strip
    assert width > 2 * 66 + 2 + 20 and height > 66 + 2 + 8
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
def test_checkpoints_load_in_txt2img_with_the_runs_config_and_size(first_run, tmp_path, name):
    txt2img = load_script("stable_txt2img", REPO / "scripts" / "stable_txt2img.py")
    status = txt2img.main(["--ckpt", str(first_run.dir / "checkpoints" / name), "--ddim_steps", "2",
                           "--n_samples", "1", "--n_iter", "1", "--device", "cpu", "--outdir", str(tmp_path),
                           "--prompt", "photo of a sks dog"])
    (sample,) = (tmp_path / "samples").glob("*.png")
    assert status == 0 and Image.open(sample).size == (64, 64)  # no --config, --H, --W: the run's own


def test_resume_continues_from_the_saved_step(first_run, tmp_path):
    run = copy_of(first_run.dir, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    proc = run_main("-r", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last.read_bytes() == before and not (run / "checkpoints" / "step_6.ckpt").exists()  # same max_steps
    assert f"nothing to train: {last} is at step 4, which is max_steps; pass --max_steps above 4" in proc.stdout

    (run / "checkpoints" / ".step_6.ckpt.tmp-123456").write_bytes(b"a write killed half-way")
    proc = run_main("-r", "latest", "-l", str(tmp_path), "--max_steps", "6",
                    "lightning.modelcheckpoint.params.keep_last_n=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"-r latest: {run} (its last.ckpt is the newest of 1 runs in {tmp_path})" in proc.stderr
    assert "removed 1 temporary files of interrupted writes (.step_6.ckpt.tmp-123456)" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt", "last.safetensors", "step_4.ckpt", "step_4.safetensors", "step_6.ckpt", "step_6.safetensors"]
    resumed = torch.load(last, map_location="cpu")
    assert resumed["global_step"] == 6
    assert int(resumed["optimizer_states"][0]["state"][0]["step"]) == 6  # Adam's moments carried on from step 4
    assert [int(r["step"]) for r in metrics(run)] == [0, 1, 2, 3, 4, 5]


def test_a_run_with_only_weights_only_files_resumes_with_a_fresh_optimizer(first_run, tmp_path):
    """As after kill -9 in a run that wrote step files only (or before this version)."""
    run = copy_of(first_run.dir, tmp_path)
    for name in ("last.ckpt", "last.safetensors"):
        (run / "checkpoints" / name).unlink()
    refused = run_main("-r", str(run))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {run / 'checkpoints'} has no last.ckpt, only weights-only step files (the newest is step_4.ckpt); "
        "add --resume_weights_only to continue from step 4 with a fresh optimizer (the optimizer's moment estimates "
        "and the learning-rate schedule's position are lost)")
    proc = run_main("-r", str(run), "--resume_weights_only", "--max_steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from the weights of {run / 'checkpoints' / 'step_4.ckpt'} at step 4 with a fresh optimizer" in (
        proc.stderr)
    assert (run / "checkpoints" / "step_6.ckpt").is_file() and not (run / "checkpoints" / "step_8.ckpt").exists()
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert resumed["global_step"] == 6
    assert int(resumed["optimizer_states"][0]["state"][0]["step"]) == 2  # a fresh AdamW, two steps old
    assert [int(r["step"]) for r in metrics(run)] == [0, 1, 2, 3, 4, 5]
    assert "summary: steps 4 to 6 (2 in this session)" in proc.stderr


def test_a_full_disk_stops_with_one_line_saying_what_is_kept(main_module, tmp_path, photos, tiny_ckpt, capsys,
                                                              monkeypatch):
    reg = make_class_images(tmp_path / "class", 1)
    real = shutil.disk_usage

    def fills_up_after_step_2(path):
        full = any(tmp_path.glob("logs/*/checkpoints/step_2.ckpt"))
        return SimpleNamespace(free=1000) if full else real(path)

    monkeypatch.setattr(shutil, "disk_usage", fills_up_after_step_2)
    status = main_module.main(fresh_run_args(tiny_ckpt, photos, reg, tmp_path / "logs",
                                             "lightning.callbacks.image_logger.params.disabled=true"))
    (run,) = (tmp_path / "logs").iterdir()
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1, lines
    assert re.fullmatch(
        rf"error: not enough disk space for {run}/checkpoints/last.ckpt: it needs about [\d.]+ MB, 1.0 kB free; kept "
        rf"{run}/checkpoints/step_2.ckpt; free some space, then resume with: python main.py -t -r {run} "
        r"--resume_weights_only", lines[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2.ckpt"]


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


def bad_checkpoint(tmp_path: Path, kind: str, good: Path) -> Path:
    """What users pass as --actual_resume by mistake."""
    if kind == "missing":
        return tmp_path / "missing.ckpt"
    if kind == "text":
        (tmp_path / "notes.ckpt").write_text("I renamed my notes\n")
        return tmp_path / "notes.ckpt"
    if kind == "diffusers":
        (tmp_path / "sd-v1-5").mkdir()
        (tmp_path / "sd-v1-5" / "model_index.json").write_text("{}")
        return tmp_path / "sd-v1-5"
    state = build_tiny_model().state_dict()
    state["model.diffusion_model.out.2.bias"][0] = float("nan")
    save_weights(state, tmp_path / "diverged.ckpt")
    return tmp_path / "diverged.ckpt"


@pytest.mark.parametrize("change, message", [
    ({"instance": "missing"}, "folder not found"),
    ({"reg": "empty"}, "no images to train on"),
    ({"reg": "same"}, "--data_root and --reg_data_root are the same folder"),
    ({"ckpt": "missing"}, "checkpoint not found"),
    ({"ckpt": "text"}, "notes.ckpt is not a checkpoint but a text file (it begins 'I renamed my notes')"),
    ({"ckpt": "diffusers"}, "sd-v1-5 is a diffusers folder without unet/config.json: not a Stable Diffusion pipeline"),
    ({"ckpt": "nan"}, "tensor model.diffusion_model.out.2.bias holds 1 NaN or inf values"),
    ({"args": ["data.params.train.params.placeholder_token=dog"]},
     "config key data.params.train.params.placeholder_token is unknown to ldm.data.personalized.PersonalizedBase"),
    ({"args": ["--gpus", "0,"]}, "--accelerator cpu"),
    ({"args": ["--max_steps", "0"]}, "--max_steps 0: the number of training steps must be at least 1"),
    ({"args": ["--max_steps", "-1"]}, "--max_steps -1: the number of training steps must be at least 1"),
    ({"args": ["--class_word", ""]}, "--class_word is empty: the captions need it (e.g. --class_word dog)"),
    ({"args": ["--token", " "]}, "--token/--identifier is empty"),
    ({"args": ["--freeze_text_encoder", "--text_encoder_lr", "1e-5"]}, "is set but the text encoder is frozen"),
    ({"logdir": "under_a_file"}, "is a file, not a folder"),
    ({"logdir": "read_only"}, "is on a read-only file system; choose another folder"),
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
    if change.get("reg") == "same":
        reg = photos.parent / ".." / photos.parent.name / photos.name
    ckpt = bad_checkpoint(tmp_path, change["ckpt"], tiny_ckpt) if change.get("ckpt") else tiny_ckpt
    logdir = tmp_path / "logs"
    if change.get("logdir") == "under_a_file":
        (tmp_path / "file").write_text("")
        logdir = tmp_path / "file" / "logs"
    if change.get("logdir") == "read_only":  # tests may run as root, who may write anywhere: fake the file system
        monkeypatch.setattr(tempfile, "TemporaryFile", lambda dir: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")))
    args = [a for a in fresh_run_args(ckpt, instance, reg, logdir) if a not in ("--accelerator", "cpu")]
    status = main_module.main(args + change.get("args", []))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and message in lines[0], lines
    assert not logdir.exists()


def test_weights_only_files_cannot_resume(tmp_path, tiny_model):
    path = tmp_path / "step_2.ckpt"
    save_weights(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="weights only.*--actual_resume"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_weights_that_are_not_finite_are_never_written(tmp_path):
    model = build_tiny_model()
    callback = StepCheckpoint(str(tmp_path), every_n_train_steps=1)
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, optimizers=[])
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
        "--precision", "bf16-mixed", "--strategy", "ddp", "--num_nodes", "2", "--class_prompt",
        "a photo of a {class_word}, studio light", "--class_negative_prompt", "blurry", "--class_sampler", "euler_a"])
    config = main_module.load_run_config([str(REPO / TINY)], ["model.params.reg_weight=0.5"])
    main_module.apply_flags(config, opt)
    train, reg = config.data.params.train.params, config.data.params.reg.params
    assert (train.data_root, reg.data_root, train.class_word, reg.class_word, train.identifier) == (
        "p", "c", "cat", "cat", "zwx")
    assert (config.data.params.num_class_images, config.model.params.cond_stage_trainable,
            config.model.params.reg_weight) == (9, False, 0.5)
    assert config.lightning.modelcheckpoint.params.safetensors is True
    assert (config.data.params.class_prompt, config.data.params.class_negative_prompt, reg.template,
            config.data.params.class_sampler) == ("a photo of a {class_word}, studio light", "blurry",
                                                  "a photo of a {class_word}, studio light", "euler_a")
    options = main_module.trainer_options(config.lightning.trainer, opt)
    assert options == {"benchmark": True, "max_steps": 7, "log_every_n_steps": 1, "accelerator": "gpu",
                       "devices": [0, 1], "precision": "bf16-mixed", "strategy": "ddp", "num_nodes": 2,
                       "enable_progress_bar": False, "enable_model_summary": False}
    assert [main_module.parse_gpus(text) for text in ("0,", "1", "0,1", "-1")] == [[0], 1, [0, 1], -1]
