"""The step sweep on the toy world: a full fine-tune and LoRA r16, three learning rates each, to 2,000 steps with a
validation round every 100 steps, over three training seeds; curves of identifier binding, recontextualisation and
leakage against the steps (sweep.png), and where each setting peaks (sweep.md, sweep.json).

    python scripts/toy_sweep.py                      # outputs/toy-sweep; about 10 minutes per run on 2 CPU cores
    python scripts/toy_sweep.py --report_only        # the report from the runs finished so far

Resumable: a finished run leaves results/<run>.json and is not run again; an unfinished one starts afresh. The
validation uses held-out prompts ("a photo of a sks ball ...", the demo says "photo of a sks ball") and held-out
seeds (100-103; the demo samples at 1000), so that what the sweep chooses is not tuned to the demo's own figures.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

from toy_demo import (BASE, CLASS_WORD, IDENTIFIER, SUBJECT, TRAINING_SEED, Runner, check_settings,  # noqa: E402
                      draw_class_images, settings_of)

from ldm.cli import run_command  # noqa: E402
from ldm.toy.sweep import read_rounds, write_sweep_report  # noqa: E402
from ldm.toy.world import COMPARED_CONTEXTS, CONTEXT_PHRASES  # noqa: E402
from ldm.util import UserError, project_path, user_or_project_path  # noqa: E402

CONFIGS = {"full": "configs/toy/v1-finetune_unfrozen.yaml", "lora16": "configs/toy/v1-finetune_lora.yaml"}
METHOD_FLAGS = {  # the text encoder stops at step 250 (the toy config's stop step), whatever --max_steps is
    "full": ["model.params.cond_stage_stop_step=250"],
    "lora16": ["--rank", "16"],
}
LEARNING_RATES = {"full": [1e-4, 2e-4, 4e-4], "lora16": [5e-4, 1e-3, 2e-3]}
HELD_OUT_PROMPTS = ["a photo of a {identifier} {class_word}", "a photo of a {class_word}",
                    *("a photo of a {identifier} {class_word} " + CONTEXT_PHRASES[c] for c in COMPARED_CONTEXTS)]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--outdir", default="outputs/toy-sweep", help="kept between invocations: finished runs are not run again")
    add("--base", type=user_or_project_path, default=BASE)
    add("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add("--seeds", type=int, default=3, help="training seeds --seed, --seed + 1, ...")
    add("--seed", type=int, default=TRAINING_SEED)
    add("--learning_rates", type=float, nargs="+", default=None,
        help="instead of each method's three (" + "; ".join(f"{m}: {', '.join(map(str, lrs))}"
                                                    for m, lrs in LEARNING_RATES.items()) + ")")
    add("--subject", type=user_or_project_path, default=SUBJECT,
        help="the subject's photos (with masks beside them, a masked loss), default the demo's")
    add("--max_steps", type=int, default=2000)
    add("--every", type=int, default=100, help="a validation round every this many steps")
    add("--val_seeds", type=int, nargs="+", default=[100, 101, 102, 103])
    add("--threads", type=int, default=1, help="torch threads per run")
    add("--class_images", type=int, default=40)
    add("--ddim_steps", type=int, default=25)
    add("--scale", type=float, default=7.5, help="guidance scale of the class images")
    add("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run (a quick check)")
    add("--report_only", action="store_true", help="write the report from the finished runs and stop")
    return parser.parse_args(argv)


def run_settings(opt: argparse.Namespace) -> dict[str, Any]:
    """What a run's result depends on besides its method, learning rate and seed (kept with each result)."""
    return settings_of(opt, ("base", "subject", "max_steps", "every", "val_seeds", "set"))


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def train(runner: Runner, method: str, lr: float, seed: int, class_folder: Path, opt: argparse.Namespace) -> dict:
    """One run of main.py with validation every `opt.every` steps; its validation rounds and best step."""
    name = run_name(method, lr, seed)
    logdir = runner.outdir / "runs" / name
    if logdir.exists():
        shutil.rmtree(logdir)  # an unfinished run (the sweep was stopped) starts afresh
    validation = "lightning.callbacks.validation.params"
    prompts = "[" + ", ".join(f"'{p}'" for p in HELD_OUT_PROMPTS) + "]"
    started = time.monotonic()
    runner.run("fine-tune", name, "main.py", "--base", CONFIGS[method], "-t", "--actual_resume", opt.base,
               "-n", name, "--accelerator", "cpu", "--data_root", opt.subject, "--reg_data_root", str(class_folder),
               "--class_word", CLASS_WORD, "--token", IDENTIFIER, "-l", str(logdir), "--seed", str(seed),
               "--max_steps", str(opt.max_steps), *METHOD_FLAGS[method], f"model.base_learning_rate={lr}",
               f"{validation}.every_n_steps={opt.every}", f"{validation}.prompts={prompts}",
               f"{validation}.seeds=[{','.join(map(str, opt.val_seeds))}]",
               f"lightning.callbacks.eval_loss.params.every_n_steps={opt.every}", *opt.set)
    (run,) = logdir.iterdir()
    best = run / "checkpoints" / "best.json"
    return {"method": method, "lr": lr, "seed": seed, "run": str(run), "seconds": round(time.monotonic() - started),
            "rounds": {str(step): values for step, values in read_rounds(run).items()},
            "best": json.loads(best.read_text()) if best.is_file() else None, "settings": run_settings(opt)}


def sweep(opt: argparse.Namespace) -> int:
    outdir, results_dir = Path(opt.outdir), Path(opt.outdir) / "results"
    for path in (opt.base, project_path("data/toy/scorer.safetensors"), opt.subject):
        if not Path(path).exists():
            raise UserError(f"{path} is missing; scripts/pretrain_toy_model.py and scripts/make_toy_subject.py make it")
    runner = Runner(outdir, opt.threads)
    results_dir.mkdir(exist_ok=True)
    plan = [(method, lr, opt.seed + k) for k in range(opt.seeds) for method in opt.methods
            for lr in opt.learning_rates or LEARNING_RATES[method]]  # seed by seed: a stopped sweep has each setting
    if not opt.report_only:
        check_settings(results_dir, run_settings(opt))
        class_folder = outdir / "class_images"
        if len(list(class_folder.rglob("*.png"))) < opt.class_images:
            draw_class_images(runner, opt)
        for k, (method, lr, seed) in enumerate(plan, start=1):
            done = results_dir / f"{run_name(method, lr, seed)}.json"
            if done.is_file():
                continue
            print(f"run {k} of {len(plan)}: {run_name(method, lr, seed)}", flush=True)
            result = train(runner, method, lr, seed, class_folder, opt)
            done.write_text(json.dumps(result, indent=1) + "\n")
    results = [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]
    if not results:
        raise UserError(f"no finished run in {results_dir} yet")
    commands = [f"python scripts/toy_sweep.py {' '.join(sys.argv[1:])}".strip(), *runner.commands]
    rows = write_sweep_report(outdir, results, opt.methods, commands)
    for row in rows:
        print(f"{row['setting']:18} ({row['seeds']} seeds): best step {row['best_step']}, fidelity "
              f"{100 * row['at_best']['fidelity']:.0f} % (at step {row['last_step']}: "
              f"{100 * row['at_last']['fidelity']:.0f} %)")
    print(f"report: {outdir / 'sweep.md'}, curves: {outdir / 'sweep.png'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: sweep(opt))


if __name__ == "__main__":
    sys.exit(main())
