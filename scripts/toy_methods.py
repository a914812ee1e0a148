"""Every way to personalise the model, side by side on the toy world, over training seeds: full fine-tune (with class
images, and with the frozen-model prior), LoRA r4, r8 and r16, DoRA, LoHa and LoKr at r8, LoRA r16 extracted from the
full fine-tune, textual inversion, and pivotal tuning (embedding + LoRA r8). Each trains through main.py with its
config's recipe (the demo's subject, class images, steps and training seed), samples the demo's prompts at the demo's
seeds through stable_txt2img.py and is scored by the toy scorer: methods.md (the table: mean and min-max over the
seeds, file size, trained parameters, s/step, peak RSS), methods.json and methods.png (the first seed's samples).

    python scripts/toy_methods.py                      # outputs/toy-methods, 3 seeds; some 3 minutes a run on 2 cores
    python scripts/toy_methods.py --methods full lora16 --seeds 1
    python scripts/toy_methods.py --report_only

Resumable: a finished run leaves results/<method>-seed<N>.json and is not run again.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

from toy_demo import (BASE, CLASS_WORD, IDENTIFIER, INFERENCE_CONFIG, SUBJECT, TRAINING_SEED, Runner,  # noqa: E402
                      check_settings, draw_class_images, sample, settings_of)

from ldm.cli import run_command  # noqa: E402
from ldm.config import read_yaml  # noqa: E402
from ldm.toy.demo import PROMPTS, draw_picture, score_folder, summary_rates  # noqa: E402
from ldm.toy.methods import BY_SLUG, METHODS, Method, write_methods_report  # noqa: E402
from ldm.toy.scorer import load_scorer  # noqa: E402
from ldm.util import UserError, project_path, user_or_project_path  # noqa: E402

SCORER = project_path("data/toy/scorer.safetensors")
QUIET = [f"lightning.callbacks.{name}.params.every_n_steps=0" for name in ("validation", "eval_loss")] + [
    "lightning.callbacks.image_logger.params.disabled=true"]  # the monitors are off: s/step is training's own


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--outdir", default="outputs/toy-methods", help="kept between invocations: finished runs are not run again")
    add("--base", type=user_or_project_path, default=BASE)
    add("--methods", nargs="+", default=[m.slug for m in METHODS], choices=[m.slug for m in METHODS])
    add("--seeds", type=int, default=3, help="training seeds --seed, --seed + 1, ...")
    add("--seed", type=int, default=TRAINING_SEED)
    add("--samples", type=int, default=16, help="samples per prompt and model (the demo's)")
    add("--max_steps", type=int, default=500, help="training steps of every method (docs/methods.md: 500)")
    add("--threads", type=int, default=1)
    add("--class_images", type=int, default=40)
    add("--ddim_steps", type=int, default=25)
    add("--scale", type=float, default=7.5)
    add("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run (a quick check)")
    add("--report_only", action="store_true", help="write the report from the finished runs and stop")
    return parser.parse_args(argv)


def run_settings(opt: argparse.Namespace) -> dict[str, Any]:
    """What a result depends on besides its method and seed (kept with each result)."""
    return settings_of(opt, ("base", "max_steps", "samples", "class_images", "ddim_steps", "scale", "set"))


def trained_files(run: Path) -> tuple[list[str], list[Path]]:
    """A finished run's sampling flags and the files it adds to the base: last.ckpt's weights (its step file), the
    LoRA file, the embedding file, or both for pivotal tuning."""
    checkpoints, params = run / "checkpoints", read_yaml(next((run / "configs").glob("*-project.yaml"))).model.params
    if params.get("lora") and params.get("embedding"):
        files = [checkpoints / "last.safetensors", checkpoints / "last.embedding.safetensors"]
        return ["--lora", str(files[0]), "--embedding", f"{files[1]}:{IDENTIFIER}"], files
    if params.get("lora"):
        return ["--lora", str(checkpoints / "last.safetensors")], [checkpoints / "last.safetensors"]
    if params.get("embedding"):
        return (["--embedding", f"{checkpoints / 'last.safetensors'}:{IDENTIFIER}"],
                [checkpoints / "last.safetensors"])
    step_files = sorted(checkpoints.glob("step_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))
    return ["--ckpt", str(checkpoints / "last.ckpt")], step_files[-1:] or [checkpoints / "last.ckpt"]


def train(runner: Runner, method: Method, seed: int, class_folder: Path, opt: argparse.Namespace) -> dict:
    """main.py for one method and seed; the sampling flags, the files and the summary's costs."""
    logdir = runner.outdir / "runs" / f"{method.slug}-seed{seed}"
    if logdir.exists():
        shutil.rmtree(logdir)  # an unfinished run (the driver was stopped) starts afresh
    runner.run("fine-tune", logdir.name, "main.py", "--base", method.config, "-t", "--actual_resume", opt.base,
               "-n", method.slug, "--accelerator", "cpu", "--data_root", SUBJECT, "--reg_data_root", str(class_folder),
               "--class_word", CLASS_WORD, "--token", IDENTIFIER, "-l", str(logdir), "--seed", str(seed),
               "--max_steps", str(opt.max_steps), *method.flags, *QUIET, *opt.set)
    (run,) = logdir.iterdir()
    flags, files = trained_files(run)
    summary = json.loads((run / "summary.json").read_text())
    return {"flags": flags, "files": [str(p) for p in files], "run": str(run),
            **{key: summary.get(key) for key in ("trainable_parameters", "seconds_per_step", "peak_memory_bytes")}}


def extract(runner: Runner, method: Method, seed: int, done: dict[str, dict], opt: argparse.Namespace) -> dict:
    """The extracted LoRA: the difference of the source method's run (same seed) from the base, at `method.rank`."""
    source = done.get(f"{method.extracted_from}-seed{seed}")
    if source is None:
        raise UserError(f"{method.slug} factors the {method.extracted_from} run of seed {seed}: add "
                        f"{method.extracted_from} to --methods")
    output = runner.outdir / "extracted" / f"{method.slug}-seed{seed}.safetensors"
    output.parent.mkdir(exist_ok=True)
    runner.run("extract", output.stem, "extract_lora.py", source["files"][0], "--base", opt.base, "-o", str(output),
               "--rank", str(method.rank), "--config", INFERENCE_CONFIG, *method.extract_flags)
    return {"flags": ["--lora", str(output)], "files": [str(output)], "run": source["run"],
            "trainable_parameters": None, "seconds_per_step": None, "peak_memory_bytes": None}


def measure(runner: Runner, name: str, flags: list[str], prompts: Path, scorer, opt: argparse.Namespace) -> dict:
    """Sample the demo's prompts with the model's flags and score them: the per-prompt rates and the summary."""
    folder = sample(runner, name, ["--ckpt", opt.base, *flags] if flags[:1] != ["--ckpt"] else flags, prompts, opt)
    rates = score_folder(folder, scorer)
    return {"rates": rates, **summary_rates(rates), "samples": str(folder)}


def in_order(done: dict[str, dict]) -> list[dict]:
    """The finished runs, the base's first, then by seed and in METHODS' order."""
    order = {slug: index for index, slug in enumerate(BY_SLUG)}
    return sorted(done.values(), key=lambda r: (r["seed"] is not None, r["seed"] or 0, order.get(r["method"], -1)))


def run_commands(done: dict[str, dict]) -> list[str]:
    """Every command the finished runs ran (over all invocations), in_order."""
    return [command for result in in_order(done) for command in result.get("commands", [])]


def compare(opt: argparse.Namespace) -> int:
    outdir, results = Path(opt.outdir), Path(opt.outdir) / "results"
    for path in (opt.base, SCORER, SUBJECT):
        if not Path(path).exists():
            raise UserError(f"{path} is missing; scripts/pretrain_toy_model.py and scripts/make_toy_subject.py make it")
    runner = Runner(outdir, opt.threads)
    results.mkdir(exist_ok=True)
    done = {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}
    if not opt.report_only:
        check_settings(results, run_settings(opt))
        prompts = outdir / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        scorer = load_scorer(SCORER)
        if len(list((outdir / "class_images").rglob("*.png"))) < opt.class_images:
            draw_class_images(runner, opt)
        if "base" not in done:
            done["base"] = {"method": "base", "seed": None, **measure(runner, "base", ["--ckpt", opt.base], prompts,
                                                                      scorer, opt), "commands": runner.commands[:],
                             "settings": run_settings(opt)}
            (results / "base.json").write_text(json.dumps(done["base"], indent=1) + "\n")
        for seed in range(opt.seed, opt.seed + opt.seeds):
            for slug in opt.methods:
                name, method = f"{slug}-seed{seed}", BY_SLUG[slug]
                if name in done:
                    continue
                print(f"{name}: {method.label}", flush=True)
                start = len(runner.commands)
                trained = (extract(runner, method, seed, done, opt) if method.extracted_from
                           else train(runner, method, seed, outdir / "class_images", opt))
                sizes = sum(Path(p).stat().st_size for p in trained["files"])
                done[name] = {"method": slug, "seed": seed, **trained, "file_bytes": sizes,
                              **measure(runner, name, trained["flags"], prompts, scorer, opt),
                              "commands": runner.commands[start:], "settings": run_settings(opt)}
                (results / f"{name}.json").write_text(json.dumps(done[name], indent=1) + "\n")
    if not done:
        raise UserError(f"no finished run in {results} yet")
    machine = f"{os.cpu_count()} CPU cores, {opt.threads} torch thread(s) per process"
    invocation = f"python scripts/toy_methods.py {' '.join(sys.argv[1:])}".strip()
    rows = write_methods_report(outdir, list(done.values()), machine, [invocation, *run_commands(done)])
    first = [result for result in in_order(done) if result["seed"] in (None, opt.seed)]
    folders = {BY_SLUG[r["method"]].label if r["method"] in BY_SLUG else "base": Path(r["samples"]) for r in first}
    rates = {BY_SLUG[r["method"]].label if r["method"] in BY_SLUG else "base": r["rates"] for r in first}
    draw_picture(outdir / "methods.png", folders, rates)
    for row in rows:
        binding = row["binding"]
        print(f"{row['label']:45} binding {100 * binding['mean']:.0f} % over {binding['n']} run(s)")
    print(f"report: {outdir / 'methods.md'}, picture: {outdir / 'methods.png'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: compare(opt))


if __name__ == "__main__":
    sys.exit(main())
