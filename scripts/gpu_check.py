"""sd-gpu-check: what this machine's GPU can do with this project, measured with full-size random weights that the
project writes itself (nothing is downloaded): versions and the card, the SDPA kernels of the model's attention
shapes, the 8-bit AdamW kernel compiled on the device, a lowmem training step at 512 px with prior preservation and
its image-logging step under a memory cap, the fastest config's s/step and MFU, and 50 DDIM steps with and without a
ControlNet. Prints a table, writes JSON, and ends with a verdict per config. About 5 minutes on an H100.

    sd-gpu-check                      # every stage, full size, 512 px
    sd-gpu-check --vram 6             # as if the card had 6 GiB
    sd-gpu-check --stages env,sdpa    # a subset (env always runs)
    sd-gpu-check --tiny               # the tiny configs and small sizes: a few minutes on a CPU

Every stage runs in a process of its own, so that an out-of-memory error or a broken kernel in one leaves the others
standing; a failed stage is one line of the table, and the exit status is 1 when any failed.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent  # scripts/ in a clone, dreambooth_scripts/ once installed
REPO = SCRIPTS.parent
sys.path[:0] = [str(REPO), str(SCRIPTS)]  # ldm, and benchmarks/ beside this file

import torch  # noqa: E402

from benchmarks import device_check  # noqa: E402
from benchmarks.common import random_checkpoint, write_photos  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.util import START_TIME_ENV, UserError, atomic_write_text, ensure_writable_dir, project_path  # noqa: E402

STAGES = ("env", "sdpa", "adamw8bit", "lowmem", "fastest", "sampling")
GiB = device_check.GiB
OOM_MARKS = ("OutOfMemoryError", "CUDA out of memory")
# Every stage runs in a process of its own, from the file of its worker (benchmarks/gpu_stage_*.py): the light stages
# import neither transformers nor Lightning, so they start in a second.
STAGE_FILES = {"env": "gpu_stage_light.py", "sdpa": "gpu_stage_light.py", "adamw8bit": "gpu_stage_light.py",
               "train": "gpu_stage_train.py", "sampling": "gpu_stage_sampling.py"}
TARGETS = {"lowmem_reserved_gib": 6.0, "fastest_800_steps_s": 60.0, "ddim_50_s": 1.0}  # issue 33, on an H100


@dataclass(frozen=True)
class Sizes:
    """The configs and how much of each stage runs: full size on a GPU, or the tiny twins (--tiny)."""
    configs: str
    controlnet: str
    size: int
    lowmem_steps: int  # training steps of the lowmem run; the image logger runs at log_step (only: 2 x log_step > it)
    log_step: int
    fastest_steps: int
    ddim_steps: int
    repeats: int
    timeout_s: int  # of each stage's process


FULL = Sizes("configs/stable-diffusion", "configs/controlnet/cldm_v15.yaml", 512, 5, 3, 8, 50, 3, 600)
TINY = Sizes("configs/tiny", "configs/tiny/cldm_v15.yaml", 64, 4, 3, 4, 5, 1, 300)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sd-gpu-check", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--vram", type=float, default=None, metavar="GiB",
        help="memory cap of every stage (torch.cuda.set_per_process_memory_fraction; default: the card's total)")
    add("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    add("--tiny", action="store_true", help="the tiny configs (configs/tiny/), small sizes and step counts")
    add("--device", choices=["auto", "cuda", "cpu"], default="auto")
    add("--out", default=None, help="the JSON report (default: outputs/gpu-check/<date>-<time>.json)")
    add("--workdir", default=None, help="keeps the random checkpoint, photos and logs for another run (default: a "
        "temporary folder; full size needs ~20 GB of disk for the checkpoints the runs write)")
    return parser.parse_args(argv)


# --- the parent: stages as processes -------------------------------------------------------------------------------

class StageFailed(Exception):
    """A stage's process ended without a result; `status` is "failed" or "does not fit" (out of memory)."""

    def __init__(self, status: str, line: str):
        super().__init__(line)
        self.status = status


class Check:
    """One run of the self-check: the options, the sizes, the work folder, and what the env stage found."""

    def __init__(self, opt: argparse.Namespace, work: Path):
        self.opt, self.work = opt, work
        self.sizes = TINY if opt.tiny else FULL
        self.device = "cuda" if opt.device == "cuda" or (opt.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.env: dict = {}
        self._ckpt: Optional[Path] = None

    def config(self, name: str) -> str:
        return str(project_path(f"{self.sizes.configs}/{name}"))  # the clone's, or the installed package's

    @property
    def cap_gib(self) -> Optional[float]:
        """The memory cap: --vram, else the card's total (None on a CPU)."""
        return None if self.device != "cuda" else self.opt.vram or self.env.get("total_gib")

    @property
    def bf16(self) -> bool:
        return bool(self.env.get("bf16_native"))

    def checkpoint(self) -> Path:
        """The inference config's model with random weights (every stage's SD v1 file), written once."""
        if self._ckpt is None:
            self._ckpt = random_checkpoint(load_config(self.config("v1-inference.yaml")), self.work)
        return self._ckpt

    def run(self, stage: str, worker: str, spec: dict, env: Optional[dict] = None) -> dict:
        """Run `worker` with `spec` in a process of its own (log in the work folder); its result."""
        folder = self.work / "stages"
        folder.mkdir(exist_ok=True)
        total = self.env.get("total_gib")
        fraction = min(1.0, self.cap_gib / total) if self.cap_gib and total else None
        spec = {**spec, "worker": worker, "device": self.device, "memory_fraction": fraction,
                "output": str(folder / f"{stage}.json")}
        spec_path, log = folder / f"{stage}-spec.json", folder / f"{stage}.log"
        spec_path.write_text(json.dumps(spec))
        Path(spec["output"]).unlink(missing_ok=True)
        command = [sys.executable, str(SCRIPTS / "benchmarks" / STAGE_FILES[worker]), str(spec_path)]
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", START_TIME_ENV: repr(time.time()), **(env or {})}
        try:
            with open(log, "w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environ, cwd=REPO,
                                      timeout=self.sizes.timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise StageFailed("failed", f"no result after {self.sizes.timeout_s} s{self.kept(log)}") from None
        text = log.read_text(errors="replace")
        if code != 0 or not Path(spec["output"]).is_file():
            if any(mark in text for mark in OOM_MARKS):
                raise StageFailed("does not fit", f"out of memory under a cap of {self.cap_gib:.1f} GiB"
                                  if self.cap_gib else "out of memory")
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            raise StageFailed("failed", f"{lines[-1] if lines else 'no output'} (exit status {code}{self.kept(log)})")
        return json.loads(Path(spec["output"]).read_text())

    def kept(self, log: Path) -> str:
        return f", log: {log}" if self.opt.workdir else ", --workdir keeps the logs"

    def train_argv(self, config: str, steps: int, tag: str, extra: Sequence[str]) -> tuple[list[str], Path, Path]:
        """main.py's arguments for `steps` steps at the check's size, batch 1 + 1 with prior preservation, no step
        files, with the StepTimer; the run folder and the timer's file."""
        photos, size = write_photos(self.work, self.sizes.size), self.sizes.size
        logdir, timer = self.work / "runs" / tag, self.work / "stages" / f"{tag}-timer.json"
        argv = ["--base", config, "-t", "--actual_resume", str(self.checkpoint()), "--data_root",
                str(photos / "instance"), "--reg_data_root", str(photos / "class"), "--max_steps", str(steps), "-l",
                str(logdir), "-n", "gpu-check"]
        argv += ["--accelerator", "gpu", "--devices", "1"] if self.device == "cuda" else ["--accelerator", "cpu"]
        argv += ["data.params.batch_size=1", f"data.params.train.params.size={size}",
                 f"data.params.reg.params.size={size}", "lightning.modelcheckpoint.params.every_n_train_steps=0",
                 "lightning.modelcheckpoint.params.save_last_every_n_steps=0",
                 "lightning.callbacks.timer.target=ldm.callbacks.StepTimer",
                 f"lightning.callbacks.timer.params.output={timer}", *extra]
        return argv, logdir, timer

    def train(self, stage: str, config: str, steps: int, extra: Sequence[str], env: Optional[dict] = None) -> dict:
        argv, logdir, timer = self.train_argv(config, steps, stage, extra)
        try:
            result = self.run(stage, "train", {"argv": argv, "timer": str(timer)}, env)
            return {**result, "sample_grids": len(list(logdir.glob("*/images/train/samples_*.png")))}
        finally:
            shutil.rmtree(logdir, ignore_errors=True)  # its last.ckpt: up to 13 GB at full size


# --- the stages: each returns its JSON record, with "rows" for the table -----------------------------------------

def gib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def reserved(value: Optional[float]) -> str:
    return "" if value is None else f", peak {value:.2f} GiB reserved"


def stage_env(check: Check) -> dict:
    env = check.run("env", "env", {})
    check.env = env
    rows = [("versions", f"python {env['python']}, torch {env['torch']}, lightning {env['lightning']}, CUDA "
                         f"{env['cuda']}, cuDNN {env['cudnn']}, triton {env['triton']}"),
            ("device", f"{env['name']} ({'compute' if check.device == 'cuda' else 'CPU'} capability "
                       f"{env['capability']})")]
    if check.device == "cuda":
        rows += [("native bf16", "yes" if env["bf16_native"] else "no: bf16 is emulated; use 16-mixed or fp32"),
                 ("memory", f"{env['free_gib']:.2f} GiB free of {env['total_gib']:.2f} GiB; cap {check.cap_gib:.2f} "
                            "GiB"),
                 ("peak dense bf16", f"{env['peak_tflops']} TFLOP/s" if env["peak_tflops"] else "unknown card")]
    return {**env, "rows": rows}


def stage_sdpa(check: Check) -> dict:
    dtype = "float32" if check.device == "cpu" else "bfloat16" if check.bf16 else "float16"
    served = check.run("sdpa", "sdpa", {"config": check.config("v1-inference.yaml"), "size": check.sizes.size,
                                        "dtype": dtype})
    rows = [(f"{label} ({dtype})", ", ".join(name for name, ok in kernels.items() if ok) or "none")
            for label, kernels in served.items()]
    return {"dtype": dtype, "kernels": served, "rows": rows}


def stage_adamw8bit(check: Check) -> dict:
    result = check.run("adamw8bit", "adamw8bit", {})
    rows = []
    for key, value in result.items():
        text = format(value, ".4g") if isinstance(value, float) else "n/a on cpu" if value is None else str(value)
        rows.append((key.replace("_", " "), text))
    return {**result, "rows": rows}


def training_rows(result: dict, skip: int) -> tuple[dict, list]:
    """s/step (median of steps 2..N other than the `skip`-th, 1-based) and peak memory of a StepTimer result."""
    steps = [s for i, s in enumerate(result["steps"][1:], start=2) if i != skip]
    record = {"s_per_step": statistics.median(steps), "steps": result["steps"], "precision": result["precision"],
              "optimizer": result["optimizer"], "peak_rss_gib": (result["peak_rss_bytes"] or 0) / GiB,
              "startup_s": result["startup_s"]}
    peaks = result.get("cuda_step_peaks")
    if peaks:
        kept = [p for i, p in enumerate(peaks, start=1) if i != skip]
        record.update(peak_allocated_gib=max(p[0] for p in kept) / GiB, peak_reserved_gib=max(p[1] for p in kept) / GiB)
    memory = (f"peak {gib(record['peak_allocated_gib'])} allocated, {gib(record['peak_reserved_gib'])} reserved"
              if peaks else f"peak RSS {gib(record['peak_rss_gib'])} (the whole process)")
    startup = "" if result["startup_s"] is None else f", start-up {result['startup_s']:.1f} s"
    rows = [("training step", f"{record['s_per_step']:.3f} s/step, {memory}{startup} ({result['precision']}, "
                              f"{result['optimizer']})")]
    return record, rows


def stage_lowmem(check: Check) -> dict:
    sizes = check.sizes
    extra = [f"lightning.callbacks.image_logger.params.batch_frequency={sizes.log_step}"]
    if not check.bf16:
        extra += ["--precision", "32"]  # bf16-true is emulated below compute capability 8.0 (and on most CPUs)
    if check.device == "cpu":
        extra.append("model.params.optimizer.params.compile=false")  # ~25 s a compile: the adamw8bit stage has it
    env = {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    result = check.train("lowmem", check.config("v1-finetune_lowmem.yaml"), sizes.lowmem_steps, extra, env)
    record, rows = training_rows(result, sizes.log_step)
    record.update(image_logging_s=result["steps"][sizes.log_step - 1] - record["s_per_step"],
                  sample_grids=result["sample_grids"])
    peaks = result.get("cuda_step_peaks")
    if peaks:
        record.update(logging_allocated_gib=peaks[sizes.log_step - 1][0] / GiB,
                      logging_reserved_gib=peaks[sizes.log_step - 1][1] / GiB)
    memory = (f", peak {gib(record['logging_allocated_gib'])} allocated, {gib(record['logging_reserved_gib'])} "
              "reserved" if peaks else "")
    rows.append(("image-logging step", f"+{record['image_logging_s']:.2f} s over a step{memory}, "
                                       f"{record['sample_grids']} sample grids written"))
    return {**record, "rows": rows, "settings": extra}


def fastest_precision(check: Check) -> str:
    return "32" if check.device == "cpu" else "bf16-mixed" if check.bf16 else "16-mixed"


def stage_fastest(check: Check) -> dict:
    precision = fastest_precision(check)
    config = check.config("v1-finetune_unfrozen.yaml")
    extra = ["--precision", precision, "lightning.callbacks.image_logger.params.disabled=true"]
    result = check.train("fastest", config, check.sizes.fastest_steps, extra)
    record, rows = training_rows(result, skip=0)
    flops = device_check.step_flops(load_config(config), check.sizes.size)
    achieved = flops / record["s_per_step"] / 1e12
    peak = check.env.get("peak_tflops")
    record.update(flops_per_step=flops, achieved_tflops=achieved, mfu=achieved / peak if peak else None,
                  steps_800_s=800 * record["s_per_step"], config=f"v1-finetune_unfrozen --precision {precision}")
    mfu = f"MFU {100 * record['mfu']:.1f} % of {peak:g} TFLOP/s" if peak else "MFU n/a (card not in the table)"
    rows += [("FLOPs per step", f"{flops / 1e12:.3g} TFLOP counted (forward + backward), {achieved:.3g} TFLOP/s, "
                                f"{mfu}"),
             ("800 steps", f"{record['steps_800_s']:.0f} s (s/step x 800, start-up not included)")]
    return {**record, "rows": rows}


def stage_sampling(check: Check) -> dict:
    spec = {"config": check.config("v1-inference.yaml"), "ckpt": str(check.checkpoint()),
            "controlnet": str(project_path(check.sizes.controlnet)),
            "size": check.sizes.size, "steps": check.sizes.ddim_steps, "repeats": check.sizes.repeats}
    result = check.run("sampling", "sampling", spec)
    what = f"{check.sizes.ddim_steps} DDIM steps, {check.sizes.size} px, guidance 7.5"
    controlnet = f"{result['controlnet_s']:.3f} s{reserved(result['controlnet_peak_reserved_gib'])}"
    plain = f"{result['plain_s']:.3f} s{reserved(result['peak_reserved_gib'])}"
    rows = [(what, plain), (f"{what}, ControlNet", controlnet)]
    return {**result, "rows": rows}


STAGE_FUNCTIONS: dict[str, Callable[[Check], dict]] = {
    "env": stage_env, "sdpa": stage_sdpa, "adamw8bit": stage_adamw8bit, "lowmem": stage_lowmem,
    "fastest": stage_fastest, "sampling": stage_sampling}


# --- verdicts, the table, the report -------------------------------------------------------------------------------

def verdicts(check: Check, records: dict[str, dict]) -> list[tuple[str, str]]:
    """Whether each training config fits this card (under the cap), the targets of issue 33 on a GPU, and the
    config to start with: the fastest that fits."""
    cap = f"{check.cap_gib:.1f} GiB" if check.cap_gib else "this machine's memory"
    names = {"fastest": records.get("fastest", {}).get("config", "v1-finetune_unfrozen"),
             "lowmem": "v1-finetune_lowmem" + ("" if check.bf16 else " --precision 32")}
    rows, fits = [], []
    for stage in ("fastest", "lowmem"):
        record = records.get(stage)
        if record is None:
            continue
        if record["status"] == "ok":
            fits.append(names[stage])
            peak = record.get("peak_reserved_gib")
            rows.append((names[stage], f"fits under {cap}" + (f" (peak {peak:.2f} GiB reserved)" if peak else "")))
        else:
            rows.append((names[stage], "does not fit under " + cap if record["status"] == "does not fit" else
                         "unknown: its stage failed"))
    if check.device == "cuda" and not check.opt.tiny:
        rows += target_rows(records)
    if rows:
        rows.append(("start with", fits[0] if fits else "none of the measured configs: try LoRA "
                     "(configs/stable-diffusion/v1-finetune_lora.yaml, not measured here) or a larger card"))
    return rows


def target_rows(records: dict[str, dict]) -> list[tuple[str, str]]:
    """The issue's targets, met or not, where their stage ran."""
    measured = [("lowmem <= 6 GiB reserved", records.get("lowmem", {}).get("peak_reserved_gib"),
                 TARGETS["lowmem_reserved_gib"], "GiB"),
                ("800 steps <= 60 s (H100)", records.get("fastest", {}).get("steps_800_s"),
                 TARGETS["fastest_800_steps_s"], "s"),
                ("50 DDIM steps <= 1 s (H100)", records.get("sampling", {}).get("plain_s"), TARGETS["ddim_50_s"], "s")]
    return [(f"target: {name}", f"{'met' if value <= limit else 'missed'} ({value:.2f} {unit})")
            for name, value, limit, unit in measured if value is not None]


def print_table(title: str, records: dict[str, dict], verdict_rows: list[tuple[str, str]]) -> None:
    print(title)
    print(f"{'stage':<10} {'what':<44} result")
    for stage, record in records.items():
        rows = record.get("rows") or [("", f"{record['status']}: {record['error']}")]
        for what, result in rows:
            print(f"{stage:<10} {what:<44} {result}")
    for what, result in verdict_rows:
        print(f"{'verdict':<10} {what:<44} {result}")


def parse_stages(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in STAGES]
    if unknown or not chosen:
        raise UserError(f"--stages {text!r}: expected a comma-separated subset of {','.join(STAGES)}")
    return ["env"] + [name for name in STAGES[1:] if name in chosen]


def run_stages(check: Check, stages: Sequence[str]) -> dict[str, dict]:
    """Each stage in turn, its failure caught as its record's status and error line."""
    records: dict[str, dict] = {}
    for i, stage in enumerate(stages, start=1):
        progress(f"[{i}/{len(stages)}] {stage}")
        started = time.monotonic()
        try:
            record = {"status": "ok", **STAGE_FUNCTIONS[stage](check)}
        except StageFailed as err:
            record = {"status": err.status, "error": str(err)}
        except Exception as err:  # noqa: BLE001 - one broken stage must not hide the others; the table says why
            record = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0]}
        record["seconds"] = time.monotonic() - started
        progress(f"  {record['status']} in {record['seconds']:.1f} s")
        records[stage] = record
    return records


def self_check(opt: argparse.Namespace) -> str:
    stages = parse_stages(opt.stages)
    if opt.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: PyTorch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if opt.vram is not None and (opt.vram <= 0 or opt.device == "cpu" or not torch.cuda.is_available()):
        raise UserError(f"--vram {opt.vram}: caps a CUDA card's memory, so it needs a card and a positive number of "
                        "GiB")
    out = Path(opt.out or f"outputs/gpu-check/{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    ensure_writable_dir(out.parent, "--out")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(opt.workdir or tmp).resolve()  # the stage processes run in the repository
        work.mkdir(parents=True, exist_ok=True)
        check = Check(opt, work)
        records = run_stages(check, stages)
    verdict_rows = verdicts(check, records)
    sizes = check.sizes
    title = (f"sd-gpu-check: {check.env.get('name', check.device)}, {sizes.configs} at {sizes.size} px, memory cap "
             f"{f'{check.cap_gib:.1f} GiB' if check.cap_gib else 'none'}")
    print_table(title, records, verdict_rows)
    report = {"title": title, "tiny": opt.tiny, "device": check.device, "cap_gib": check.cap_gib,
              "stages": {name: {k: v for k, v in record.items() if k != "rows"} for name, record in records.items()},
              "verdicts": dict(verdict_rows)}
    atomic_write_text(out, json.dumps(report, indent=1))
    failed = [name for name, record in records.items() if record["status"] == "failed"]
    if failed:
        raise UserError(f"stage(s) failed: {', '.join(failed)}; the table above says why, the report is in {out}")
    return f"report written to {out}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: self_check(opt))


if __name__ == "__main__":
    sys.exit(main())
