"""The demo: DreamBooth on the toy world, end to end on a CPU, through the real command lines, with a measured report.

    make demo             # or: python scripts/toy_demo.py
    make demo-drift       # also fine-tunes with reg_weight 0 (no prior preservation) to show language drift
    python scripts/toy_demo.py --seeds 3   # three training seeds: each rate's mean and min-max over them

1. scripts/stable_txt2img.py draws the class images ("photo of a ball") with the base model;
2. main.py fine-tunes the base model on data/toy/subject with prior preservation;
3. scripts/stable_txt2img.py samples the demo's prompts from the base and the fine-tuned model (fixed seeds);
4. the toy scorer measures, per prompt, how often the subject and the asked context appear: report.md,
   report.json and report.png in the output folder.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Sequence


SCRIPTS = Path(__file__).resolve().parent  # scripts/ in a clone, dreambooth_scripts/ once installed
sys.path.insert(0, str(SCRIPTS.parent))

from ldm.cli import run_command  # noqa: E402
from ldm.config import read_yaml, shown  # noqa: E402
from ldm.toy.demo import (CLASS_WORD, IDENTIFIER, PROMPTS, draw_picture, percent, score_folder,  # noqa: E402
                          write_report)
from ldm.toy.scorer import load_scorer  # noqa: E402
from ldm.util import UserError, project_path, user_or_project_path  # noqa: E402

BASE = "data/toy/toy-v1.safetensors"
SCORER = shown(project_path("data/toy/scorer.safetensors"))
SUBJECT = shown(project_path("data/toy/subject"))
INFERENCE_CONFIG = shown(project_path("configs/toy/v1-inference.yaml"))
FINETUNE_CONFIG = "configs/toy/v1-finetune_unfrozen.yaml"
SAMPLING = ["--config", INFERENCE_CONFIG, "--device", "cpu", "--skip_grid"]
TRAINING_SEED = 23  # main.py's default --seed
PATH_OPTIONS = ("base", "subject")  # options that name files, kept resolved by settings_of
COMMANDS = {"main.py": SCRIPTS.parent / "main.py", "stable_txt2img.py": SCRIPTS / "stable_txt2img.py",
            "extract_lora.py": SCRIPTS / "extract_lora.py"}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--outdir", default="outputs/demo", help="made afresh (an older one is replaced), in the working folder")
    add("--base", type=user_or_project_path, default=BASE, help="the base model (default: the committed toy model)")
    add("--config", type=user_or_project_path, default=FINETUNE_CONFIG,
        help="the fine-tune config, e.g. configs/toy/v1-finetune_lowmem.yaml")
    add("--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides for the fine-tune, as main.py takes them, e.g. model.base_learning_rate=1e-4")
    add("--drift", action="store_true", help="also fine-tune with reg_weight 0 and compare")
    add("--seeds", type=int, default=1, help="fine-tune with this many training seeds (--seed, --seed + 1, ...) and "
        "report each rate's mean and min-max over them")
    add("--seed", type=int, default=TRAINING_SEED, help="the (first) training seed, main.py's --seed")
    add("--quick", action="store_true", help="a pipeline check: few steps and samples (the rates mean nothing)")
    add("--threads", type=int, default=1, help="torch threads per process (1, the fastest for this tiny model: "
        "see docs/toy-world.md)")
    add("--samples", type=int, default=16, help="samples per prompt and model")
    add("--class_images", type=int, default=40)
    add("--max_steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    add("--ddim_steps", type=int, default=25)
    add("--scale", type=float, default=7.5, help="guidance scale of the class images and the samples")
    return parser.parse_args(argv)


@dataclass
class Job:
    """A command line running in the background, its output going to `log`; `watcher` notes when it ends."""
    stage: str
    name: str
    process: subprocess.Popen
    log: Path
    output: IO[str]
    started: float
    ended: Optional[float] = None
    watcher: Optional[threading.Thread] = None

    def watch(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()


class Runner:
    """Runs the demo's command lines, each logged to its own file, and times them: `run` waits for its command,
    `start` leaves it running beside the others, at most `parallel` at once (one per core the threads leave)."""

    def __init__(self, outdir: Path, threads: int, parallel: int = 1):
        self.outdir, self.logs = outdir, outdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.parallel = parallel
        self.running: list[Job] = []
        self.commands: list[str] = []
        self.stages: dict[str, float] = {}
        self.began = time.monotonic()

    def run(self, stage: str, name: str, script: str, *args: str) -> None:
        self.wait(self.start(stage, name, script, *args))

    def start(self, stage: str, name: str, script: str, *args: str) -> Job:
        while len(self.running) >= self.parallel:
            self.wait(self.running[0])
        command = ["python", shown(COMMANDS[script]), *args]
        self.commands.append(shlex.join(command))
        print(f"[{stage}] {shlex.join(command)}", flush=True)
        log = self.logs / f"{name}.log"
        output = open(log, "w")
        process = subprocess.Popen([sys.executable, *command[1:]], env=self.env, stdout=output,
                                   stderr=subprocess.STDOUT)
        job = Job(stage, name, process, log, output, time.monotonic())
        job.watcher = threading.Thread(target=job.watch, daemon=True)
        job.watcher.start()
        self.running.append(job)
        return job

    def wait(self, job: Job) -> None:
        """Wait for `job`; if it failed, stop the others and exit with its log's last lines."""
        job.watcher.join()
        returncode = job.process.returncode
        job.output.close()
        self.running.remove(job)
        seconds = job.ended - job.started
        self.stages[job.stage] = round(self.stages.get(job.stage, 0.0) + seconds, 1)
        if returncode != 0:
            self.stop()
            tail = "\n".join(job.log.read_text().splitlines()[-15:])
            raise SystemExit(f"{tail}\nerror: the {job.name} step failed (exit {returncode}); log: {job.log}")
        print(f"[{job.stage}] {job.name} done in {seconds:.0f} s (log: {job.log})", flush=True)

    def finish(self) -> None:
        """Wait for every command still running."""
        while self.running:
            self.wait(self.running[0])

    def seconds(self) -> float:
        """The wall-clock seconds since the runner began."""
        return round(time.monotonic() - self.began, 1)

    def stop(self) -> None:
        """End the commands still running (after a failure or an interrupt)."""
        for job in self.running:
            job.process.terminate()
            job.process.wait()
            job.output.close()
        self.running = []


def settings_of(opt: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    """What a resumable driver's result keeps of its options: `keys`' values, the paths among them (--base,
    --subject) resolved and sequences as lists."""
    values = {key: getattr(opt, key) for key in keys}
    return {key: str(Path(value).resolve()) if key in PATH_OPTIONS else list(value) if isinstance(value, (list, tuple))
            else value for key, value in values.items()}


def check_settings(results_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to add runs to a resumable driver's results folder (toy_sweep.py, toy_methods.py) whose finished runs
    were made with other settings: their results would be mixed in one report. Results written before the settings
    were kept pass."""
    for path in sorted(results_dir.glob("*.json")):
        kept = json.loads(path.read_text()).get("settings")
        differ = [key for key in settings if kept is not None and kept.get(key) != settings[key]]
        if differ:
            raise UserError(f"{path} was made with other {', '.join(differ)} ("
                            + ", ".join(f"{key} {kept.get(key)}" for key in differ)
                            + "); give another --outdir, or the same settings")


def draw_class_images(runner: Runner, opt: argparse.Namespace) -> Path:
    """`opt.class_images` class images ("a photo of a ball") from the base model, seed 0, in <outdir>/class_images."""
    batch, folder = min(10, opt.class_images), runner.outdir / "class_images"
    runner.run("class images", "class-images", "stable_txt2img.py", "--ckpt", opt.base, "--prompt",
               f"a photo of a {CLASS_WORD}", "--n_samples", str(batch), "--n_iter",
               str(math.ceil(opt.class_images / batch)), "--seed", "0", "--ddim_steps", str(opt.ddim_steps),
               "--scale", str(opt.scale), "--outdir", str(folder), *SAMPLING)
    return folder


def fine_tune(runner: Runner, name: str, class_folder: Path, opt: argparse.Namespace, *overrides: str) -> list[str]:
    """Fine-tune with main.py; returns the sampling flags of the result: its last.ckpt, or a LoRA run's base and
    LoRA file."""
    logdir = runner.outdir / "runs" / name
    args = ["--base", opt.config, "-t", "--actual_resume", opt.base, "-n", name, "--accelerator", "cpu",
            "--data_root", SUBJECT, "--reg_data_root", str(class_folder), "--class_word", CLASS_WORD,
            "--token", IDENTIFIER, "-l", str(logdir)]
    if opt.max_steps is not None:
        args += ["--max_steps", str(opt.max_steps)]
    runner.run("fine-tune", name, "main.py", *args, *opt.set, *overrides)
    (run,) = logdir.iterdir()
    (config,) = (run / "configs").glob("*-project.yaml")
    if read_yaml(config).model.params.get("lora"):
        return ["--ckpt", opt.base, "--lora", str(run / "checkpoints" / "last.safetensors")]
    return ["--ckpt", str(run / "checkpoints" / "last.ckpt")]


def start_sampling(runner: Runner, name: str, model: list[str], prompts: Path, opt: argparse.Namespace) -> Path:
    """Start sampling the demo's prompts from one model (its sampling flags), the same seeds for every prompt and
    model, beside the runner's other commands; returns the folder its samples go to."""
    outdir = runner.outdir / "samples" / name
    runner.start("samples", f"samples-{name}", "stable_txt2img.py", *model, "--from-file",
                 str(prompts), "--n_samples", str(opt.samples), "--n_iter", "1", "--fixed_code", "--seed", "1000",
                 "--ddim_steps", str(opt.ddim_steps), "--scale", str(opt.scale), "--outdir", str(outdir), *SAMPLING)
    return outdir / "samples"


def sample(runner: Runner, name: str, model: list[str], prompts: Path, opt: argparse.Namespace) -> Path:
    """The demo's prompts from one model, as start_sampling, once they are all drawn."""
    folder = start_sampling(runner, name, model, prompts, opt)
    runner.finish()
    return folder


def quick_settings(opt: argparse.Namespace) -> list[str]:
    """Few steps and samples, with checkpoints, image grids and the monitors still written."""
    opt.samples, opt.class_images, opt.ddim_steps = 2, 2, 3
    opt.max_steps = opt.max_steps or 4
    return ["lightning.modelcheckpoint.params.every_n_train_steps=2",
            "lightning.callbacks.image_logger.params.batch_frequency=2",
            "lightning.callbacks.image_logger.params.max_images=1",
            "lightning.callbacks.image_logger.params.ddim_steps=2",
            "lightning.callbacks.validation.params.ddim_steps=2",
            "lightning.callbacks.eval_loss.params.timesteps=2", "lightning.callbacks.eval_loss.params.bands=2"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: demo(opt))


def demo(opt: argparse.Namespace) -> int:
    """The whole demo: class images, fine-tuning, sampling, scoring, the report."""
    for path in (opt.base, SCORER, SUBJECT):
        if not Path(path).exists():
            raise UserError(f"{path} is missing; scripts/pretrain_toy_model.py and scripts/make_toy_subject.py make it")
    if opt.seeds < 1:
        raise UserError(f"--seeds {opt.seeds}: give at least 1")
    outdir = Path(opt.outdir)
    if outdir.exists():
        shutil.rmtree(outdir)
    machine = f"{os.cpu_count()} CPU cores, {opt.threads} torch thread(s) per process"
    print(f"DreamBooth on the toy world in {outdir} ({machine})", flush=True)
    runner = Runner(outdir, opt.threads, parallel=max(1, (os.cpu_count() or 1) // opt.threads))
    try:
        folders, seeds = train_and_sample(runner, opt, quick_settings(opt) if opt.quick else [])
    finally:
        runner.stop()
    started = time.monotonic()
    scorer = load_scorer(SCORER)
    rates = {name: score_folder(folder, scorer) for name, folder in folders.items()}
    draw_picture(outdir / "report.png", folders, rates)
    runner.stages["scoring"] = round(time.monotonic() - started, 1)
    report = write_report(outdir, rates, runner.stages, runner.seconds(), runner.commands, machine, opt.quick,
                          seeds if opt.seeds > 1 else None)
    print_summary(report, rates, outdir)
    return 0


def train_and_sample(runner: Runner, opt: argparse.Namespace, overrides: list[str]) -> tuple[dict, dict]:
    """Class images, the fine-tunes and every model's samples, the base model's beside the class images and the
    first fine-tune, each fine-tuned model's beside the next fine-tune; returns the sample folders by model and the
    training seeds' models by seed."""
    prompts = runner.outdir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folders = {"base": start_sampling(runner, "base", ["--ckpt", opt.base], prompts, opt)}
    class_folder = draw_class_images(runner, opt)
    seeds = {opt.seed + k: "fine-tuned" if k == 0 else f"fine-tuned seed {opt.seed + k}" for k in range(opt.seeds)}
    runs = {name: ("dreambooth" if name == "fine-tuned" else f"dreambooth-seed{seed}",
                   [] if opt.seeds == 1 and seed == TRAINING_SEED else ["--seed", str(seed)])
            for seed, name in seeds.items()}
    if opt.drift:
        runs["reg_weight 0"] = ("no-prior", ["model.params.reg_weight=0"])
    for name, (run_name, flags) in runs.items():
        model = fine_tune(runner, run_name, class_folder, opt, *flags, *overrides)
        folders[name] = start_sampling(runner, name.replace(" ", "_"), model, prompts, opt)
    runner.finish()
    return folders, seeds


def print_summary(report: dict, rates: dict, outdir: Path) -> None:
    print(f"\nsubject / asked context, {next(iter(next(iter(rates.values())).values()))['samples']} samples per cell:")
    for prompt in PROMPTS:
        cells = "   ".join(f"{name}: {percent(r[prompt]['subject'])} / {percent(r[prompt]['context'])}"
                           for name, r in rates.items())
        print(f"  {prompt:32} {cells}")
    print()
    for row in report.get("spread", []):
        print(f"  {row['rate']}: mean {percent(row['mean'])}, min {percent(row['min'])}, max {percent(row['max'])}")
    for target in report["targets"]:
        print(f"  [{'met' if target['met'] else 'NOT met'}] {target['target']}: {target['measured']} "
              f"(goal {target['goal']})")
    print(f"\nwhole demo {report['seconds']:.0f} s; report: {outdir / 'report.md'}, picture: {outdir / 'report.png'}")


if __name__ == "__main__":
    sys.exit(main())
