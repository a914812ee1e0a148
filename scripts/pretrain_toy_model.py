"""Pretrain the toy world's base model (configs/toy/v1-inference.yaml) and its scorer, seeded, in stages:

    vae        the autoencoder on random crops of world renders; measures the latents' scale factor
    scorer     the toy scorer on renders (half through the VAE), then its validation on fresh renders
    box_head   the scorer's head for the second subject (the box), on the frozen features; then its validation
    latents    render and encode the pretraining scenes once (cached in --workdir)
    diffusion  the UNet and the text encoder on the cached latents with random captions; resumable
    all        all five in order

    python scripts/pretrain_toy_model.py --stage all

Intermediate files go to --workdir (outputs/toy-pretrain); so do the results, toy-v1.safetensors (the base model,
fp16, EMA weights), scorer.safetensors and pretraining.json (settings and measurements), unless --data_dir names
another folder: only `--data_dir data/toy` replaces the committed files, and only then is the measured scale factor
written into every toy config (configs/toy/*.yaml); otherwise the script says which value they would need. The
diffusion stage resumes the work folder's state.ckpt (it says so); `--init` with such a state is refused unless
`--fresh` starts over.
"""
import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import (load_model_weights, read_checkpoint, read_state_dict, save_checkpoint,  # noqa: E402
                            save_weights)
from ldm.cli import run_command  # noqa: E402
from ldm.config import read_yaml, shown  # noqa: E402
from ldm.toy.metrics import prompt_following  # noqa: E402
from ldm.toy.pretraining import (DiffusionPretraining, SceneLatents, psnr, random_scenes, render_all,  # noqa: E402
                                 train_vae)
from ldm.toy.scorer import (ToyScorer, fit_scorer, fit_subject_head, load_scorer, save_scorer,  # noqa: E402
                            validate_scorer)
from ldm.toy.world import BOX_SUBJECT  # noqa: E402
from ldm.util import UserError, instantiate_from_config, project_path  # noqa: E402

TOY_CONFIGS = project_path("configs/toy")
MODEL_CONFIG = TOY_CONFIGS / "v1-inference.yaml"
DATA = project_path("data/toy")  # the committed results
logger = logging.getLogger("pretrain_toy_model")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--stage", choices=["vae", "scorer", "box_head", "latents", "diffusion", "all"], default="all")
    add("--workdir", default="outputs/toy-pretrain", help="intermediate files (VAE, latents, resumable state)")
    add("--data_dir", default=None, help="where the results go: toy-v1.safetensors, scorer.safetensors, "
        "pretraining.json (default: --workdir; data/toy replaces the committed files and updates configs/toy/*.yaml)")
    add("--configs", nargs="+", default=None, help="the model config (first) and the configs that get the measured "
        "scale factor (default: configs/toy/v1-inference.yaml, and every toy config only with --data_dir data/toy)")
    add("--fresh", action="store_true", help="start the diffusion stage over, replacing the work folder's state")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1, help="torch threads (1 is fastest when the machine is shared)")
    add("--vae_steps", type=int, default=4000)
    add("--vae_pool", type=int, default=6000, help="rendered scenes the VAE crops from")
    add("--scorer_steps", type=int, default=3000)
    add("--scorer_pool", type=int, default=16000, help="rendered scenes the scorer is fitted on")
    add("--scorer_validation", type=int, default=100, help="held-out renders per context and kind for the scorer")
    add("--box_head_pool", type=int, default=6000, help="rendered scenes the box subject's head is fitted on")
    add("--box_head_steps", type=int, default=8000, help="full-batch steps of the box subject's head")
    add("--scenes", type=int, default=40000, help="pretraining scenes (latents cached once)")
    add("--steps", type=int, default=20000, help="diffusion steps in all (a resumed run goes on to this)")
    add("--batch_size", type=int, default=32)
    add("--lr", type=float, default=3e-4)
    add("--init", help="start the diffusion stage (and take the VAE) from these weights, e.g. an earlier "
        "data/toy/toy-v1.safetensors, when its resumable state is gone (else refused unless --fresh); the step count "
        "goes on from pretraining.json")
    add("--interval", type=int, default=2000, help="save, and measure prompt following, every this many steps")
    add("--eval_samples", type=int, default=8, help="samples per prompt when measuring prompt following (0: skip)")
    return parser.parse_args(argv)


def scale_factor_configs(opt: argparse.Namespace) -> list[Path]:
    """The configs that get the measured scale factor: --configs, else every toy config when the results replace the
    committed ones, else none."""
    if opt.configs:
        return [Path(p) for p in opt.configs]
    committed = Path(opt.data_dir).resolve() == DATA.resolve()
    return sorted(TOY_CONFIGS.glob("*.yaml")) if committed else []


def write_scale_factor(opt: argparse.Namespace, value: float) -> None:
    """Put the measured scale factor into the configs, keeping their comments; or say which configs would need it."""
    paths = scale_factor_configs(opt)
    for path in paths:
        text = re.sub(r"(\n\s+scale_factor: )[0-9.e+-]+", rf"\g<1>{value:.5f}", path.read_text(), count=1)
        path.write_text(text)
    if paths:
        logger.info("scale_factor %.5f written into %s", value, ", ".join(map(shown, paths)))
    else:
        logger.info("scale_factor %.5f: the weights in %s need model.params.scale_factor: %.5f in the configs that "
                    "sample or fine-tune them (configs/toy/*.yaml hold the committed model's; --data_dir data/toy "
                    "replaces that model and updates them)", value, opt.data_dir, value)


def model_config(opt: argparse.Namespace, record: dict) -> DictConfig:
    """The model config, with the scale factor that the vae stage measured for these results."""
    config = read_yaml(opt.configs[0] if opt.configs else MODEL_CONFIG)
    if "scale_factor" in record.get("vae", {}):
        config.model.params.scale_factor = record["vae"]["scale_factor"]
    return config


def scorer_path(opt: argparse.Namespace) -> Path:
    """The scorer of the results, or the committed one until a scorer stage wrote one."""
    path = Path(opt.data_dir) / "scorer.safetensors"
    return path if path.is_file() else DATA / "scorer.safetensors"


def vae_stage(opt: argparse.Namespace, workdir: Path, record: dict) -> None:
    vae = instantiate_from_config(model_config(opt, record).model.params.first_stage_config)
    torch.manual_seed(opt.seed)
    images = render_all(random_scenes(opt.vae_pool, seed=opt.seed))
    started = time.monotonic()
    train_vae(vae, images, opt.vae_steps, seed=opt.seed)
    held_out = render_all(random_scenes(max(8, opt.vae_pool // 12), seed=opt.seed + 1))  # 500 by default
    latents = SceneLatents.encode(vae, random_scenes(max(8, opt.vae_pool // 3), seed=opt.seed + 2))
    scale = 1.0 / latents.latent_std()
    record["vae"] = {"steps": opt.vae_steps, "minutes": round((time.monotonic() - started) / 60, 1),
                     "held_out_psnr_db": round(psnr(vae, held_out), 2), "scale_factor": round(scale, 5)}
    logger.info("vae: %s", record["vae"])
    save_weights(vae.state_dict(), workdir / "vae.safetensors")
    write_scale_factor(opt, scale)


def load_vae(opt: argparse.Namespace, workdir: Path) -> torch.nn.Module:
    """The VAE of the vae stage, or that of the --init weights when the stage's file is not there."""
    vae = instantiate_from_config(read_yaml(opt.configs[0] if opt.configs else MODEL_CONFIG)
                                  .model.params.first_stage_config)
    path = workdir / "vae.safetensors"
    if path.is_file() or not opt.init:
        vae.load_state_dict(read_state_dict(path))
    else:
        prefix = "first_stage_model."
        vae.load_state_dict({k[len(prefix):]: v.float() for k, v in read_state_dict(opt.init).items()
                             if k.startswith(prefix)})
    return vae.eval().requires_grad_(False)


def scorer_stage(opt: argparse.Namespace, workdir: Path, record: dict) -> None:
    vae = load_vae(opt, workdir)
    started = time.monotonic()
    scorer = fit_scorer(opt.scorer_steps, pool=opt.scorer_pool, vae=vae, seed=opt.seed)
    validation = validate_scorer(scorer, vae, per_context=opt.scorer_validation)
    record["scorer"] = {"steps": opt.scorer_steps, "minutes": round((time.monotonic() - started) / 60, 1),
                        "validation": {k: round(v, 4) for k, v in validation.items()}}
    logger.info("scorer validation: %s", json.dumps(record["scorer"]["validation"], indent=1))
    save_scorer(scorer, Path(opt.data_dir) / "scorer.safetensors")


def box_head_stage(opt: argparse.Namespace, workdir: Path, record: dict) -> None:
    vae = load_vae(opt, workdir)
    path = scorer_path(opt)
    started = time.monotonic()
    scorer = ToyScorer()
    missing = scorer.load_state_dict(read_state_dict(path), strict=False).missing_keys  # the box head is refitted
    if any(not key.startswith("heads.subject_box.") for key in missing):
        raise SystemExit(f"{path}: not a toy scorer (missing {missing}); run --stage scorer first")
    scorer = fit_subject_head(scorer, BOX_SUBJECT, pool=opt.box_head_pool, steps=opt.box_head_steps, vae=vae,
                              seed=opt.seed + 1)
    validation = validate_scorer(scorer, vae, per_context=opt.scorer_validation, subject=BOX_SUBJECT)
    record["box_head"] = {"pool": opt.box_head_pool, "steps": opt.box_head_steps,
                          "minutes": round((time.monotonic() - started) / 60, 1),
                          "validation": {k: round(v, 4) for k, v in validation.items() if "subject_box" in k}}
    logger.info("box head validation: %s", json.dumps(record["box_head"]["validation"], indent=1))
    save_scorer(scorer, Path(opt.data_dir) / "scorer.safetensors")


def latents_stage(opt: argparse.Namespace, workdir: Path, record: dict) -> None:
    started = time.monotonic()
    latents = SceneLatents.encode(load_vae(opt, workdir), random_scenes(opt.scenes, seed=opt.seed + 3))
    np.savez(workdir / "latents.npz", **latents.to_arrays())
    (workdir / "scenes.json").write_text(json.dumps(latents.scene_dicts()))
    record["latents"] = {"scenes": opt.scenes, "minutes": round((time.monotonic() - started) / 60, 1)}
    logger.info("latents: %s", record["latents"])


def diffusion_stage(opt: argparse.Namespace, workdir: Path, record: dict) -> None:
    model = instantiate_from_config(model_config(opt, record).model)
    state_path = workdir / "state.ckpt"
    if state_path.is_file() and opt.init and not opt.fresh:
        raise UserError(f"--init {opt.init}: {state_path} holds a diffusion state to resume; pass --fresh to start "
                        f"over from --init (the state is replaced), or leave out --init to resume it")
    if state_path.is_file() and opt.fresh:
        logger.info("--fresh: %s is not resumed and will be replaced", state_path)
        state_path.unlink()
    if opt.init and not state_path.is_file():
        load_model_weights(model, opt.init)
    elif not state_path.is_file():
        model.first_stage_model.load_state_dict(load_vae(opt, workdir).state_dict())  # a resumed state holds it
    arrays = dict(np.load(workdir / "latents.npz"))
    latents = SceneLatents.from_arrays(arrays, json.loads((workdir / "scenes.json").read_text()))
    trainer = DiffusionPretraining(model, latents, lr=opt.lr, batch_size=opt.batch_size, seed=opt.seed)
    if state_path.is_file():
        trainer.load_state(read_checkpoint(state_path))
        logger.info("resuming the diffusion stage from %s at step %d (--fresh starts over)", state_path, trainer.step)
    elif opt.init:
        trainer.restart_at(record.get("diffusion", {}).get("steps", 0), seed=opt.seed + 1)
        logger.info("went on from %s at step %d with a fresh optimizer", opt.init, trainer.step)
    out = Path(opt.data_dir) / "toy-v1.safetensors"
    history = record.setdefault("diffusion", {}).setdefault("history", [])
    started = time.monotonic() - record["diffusion"].get("seconds", 0)

    def checkpoint(step: int) -> None:
        save_checkpoint(trainer.state(), state_path)
        save_weights(trainer.ema_state_dict(), out, dtype=torch.float16)
        following = {}
        if opt.eval_samples:
            evaluated = instantiate_from_config(model_config(opt, record).model)
            load_model_weights(evaluated, out)
            scorer = load_scorer(scorer_path(opt))
            following = prompt_following(evaluated.eval(), scorer, samples=opt.eval_samples)
        record["diffusion"].update(steps=step, seconds=round(time.monotonic() - started), batch_size=opt.batch_size,
                                   lr=opt.lr, scenes=len(latents.scenes))
        history.append({"step": step, "minutes": round((time.monotonic() - started) / 60, 1), **following})
        logger.info("step %d: prompt following %s; saved %s", step, following, out)
        save_record(opt, record)

    trainer.run(opt.steps, on_interval=checkpoint, interval=opt.interval)


STAGES = {"vae": vae_stage, "scorer": scorer_stage, "box_head": box_head_stage, "latents": latents_stage,
          "diffusion": diffusion_stage}


def save_record(opt: argparse.Namespace, record: dict) -> None:
    (Path(opt.data_dir) / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")


def first_record(opt: argparse.Namespace) -> dict:
    """The results' pretraining.json; without one, with --init the committed record (its step count goes on)."""
    for path in (Path(opt.data_dir) / "pretraining.json", DATA / "pretraining.json" if opt.init else None):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return {}


def pretrain(opt: argparse.Namespace) -> str:
    """Run the chosen stages; where the results are."""
    torch.set_num_threads(opt.threads)
    workdir = Path(opt.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    opt.data_dir = opt.data_dir or str(workdir)
    Path(opt.data_dir).mkdir(parents=True, exist_ok=True)
    logger.info("results go to %s%s", opt.data_dir, " (the committed toy model's files: they are replaced)"
                if Path(opt.data_dir).resolve() == DATA.resolve() else "")
    record = first_record(opt)
    record.setdefault("machine", f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    stages = ["vae", "scorer", "box_head", "latents", "diffusion"] if opt.stage == "all" else [opt.stage]
    for stage in stages:
        STAGES[stage](opt, workdir, record)
        save_record(opt, record)
    return f"results in {opt.data_dir}: toy-v1.safetensors, scorer.safetensors, pretraining.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: pretrain(opt))


if __name__ == "__main__":
    sys.exit(main())
