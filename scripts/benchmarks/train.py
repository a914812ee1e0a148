"""Time DreamBooth training steps of main.py, one option set after another, against the step that diffusers'
examples/dreambooth/train_dreambooth.py takes on a model of the same sizes; or, with --unet_only, the two UNets'
forward and backward alone. Every run is a process of its own; the weights are random and the photos synthetic.

    python scripts/benchmarks/train.py --config configs/stable-diffusion/v1-finetune_unfrozen.yaml --size 256 \\
        --set fp32="" --set lowmem="--optimizer adamw8bit --fused_backward" \\
        --reference diffusers --reference_flags "--gradient_checkpointing"

A set is main.py's flags and `a.b=c` overrides, as its command line takes them. The step times are those of steps
2..N (the first warms up), the peak memory is read after the last step (before main.py writes its final last.ckpt,
whose size the settings column gives).
The default config does not checkpoint the UNet's activations (--gradient_checkpointing does, and the lowmem config);
train_dreambooth.py does only with --gradient_checkpointing. The settings column shows what each row ran with; the
reference runs with the TF32 and cuDNN autotuning flags that its set trained with.
"""
import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

# Nothing of Lightning at the top: each worker process imports what its own side needs, so that the reference's
# start-up time holds no Lightning import (and ours holds what main.py imports); both sides use transformers.
from benchmarks.common import config_key, random_checkpoint, write_photos  # noqa: E402
from benchmarks.reference import WORKERS, backend_text, default_backend, reference_parser  # noqa: E402
from ldm.checkpoint.diffusers import diffusers_unet_config  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.config import latent_shape, load_config, size_multiple  # noqa: E402
from ldm.modules.encoders.modules import build_text_config  # noqa: E402
from ldm.util import START_TIME_ENV, UserError, import_offline  # noqa: E402

DEFAULT_CONFIG = "configs/tiny/v1-finetune_unfrozen.yaml"
GiB = 2 ** 30


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add = parser.add_argument
    add("--config", default=DEFAULT_CONFIG, help="fine-tune config, as main.py --base takes it")
    add("--size", type=int, default=256, help="image side of the training photos (data sizes set by overrides)")
    add("--steps", type=int, default=6, help="training steps per run; the median is of steps 2..N")
    add("--repeats", type=int, default=1, help="runs of every set (and the reference), taken in turn")
    add("--set", action="append", default=[], metavar='NAME="FLAGS"',
        help='an option set, e.g. fp32="" or bf16="--precision bf16-mixed" (repeatable; default: one set, "default")')
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--freeze_text_encoder", dest="freeze_text_encoder", action="store_true", default=True,
                      help="train the UNet only (the default)")
    text.add_argument("--train_text_encoder", dest="freeze_text_encoder", action="store_false",
                      help="train the text encoder too (both sides)")
    add("--reference", choices=["diffusers"], default=None,
        help="also run the step of diffusers' train_dreambooth.py (at the precision of each set)")
    add("--reference_flags", default="", help="train_dreambooth.py's flags for the reference: "
        "--gradient_checkpointing, --use_8bit_adam, --mixed_precision no|fp16|bf16, --set_grads_to_none, "
        "--learning_rate, --max_grad_norm, --prior_loss_weight")
    add("--unet_only", action="store_true",
        help="time forward+backward of our UNetModel and diffusers' UNet2DConditionModel alone (--steps passes)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--threads", type=int, default=None, help="torch threads of every run, through OMP_NUM_THREADS (default: "
        "torch's choice)")
    add("--workdir", default=None, help="keeps the random checkpoints and photos for later runs (default: a "
        "temporary folder; at full size it needs room for both models and one run's last.ckpt, ~25 GB)")
    add("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    add("--spec", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # so that `--reference_flags --use_8bit_adam` is not read as two options
        if arg == "--reference_flags":
            argv[i:i + 2] = [f"--reference_flags={argv[i + 1]}"]
            break
    return parser.parse_args(argv)


def parse_sets(texts: Sequence[str]) -> dict[str, list[str]]:
    """NAME="flags" -> {NAME: tokens}."""
    sets: dict[str, list[str]] = {}
    for text in texts or ["default="]:
        name, sep, flags = text.partition("=")
        if not sep or not name.strip():
            raise UserError(f'--set {text!r}: expected NAME="flags and overrides", e.g. bf16="--precision '
                            'bf16-mixed"')
        if name in sets:
            raise UserError(f"--set {name}: given twice")
        sets[name] = shlex.split(flags)
    return sets


def mixed_precision(tokens: Sequence[str]) -> str:
    """train_dreambooth.py's --mixed_precision for a set's trainer precision (--precision or the override)."""
    value = "32"
    for i, token in enumerate(tokens):
        if token == "--precision" and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith(("--precision=", "lightning.trainer.precision=")):
            value = token.partition("=")[2]
    return "bf16" if value.startswith("bf16") else "fp16" if value.startswith("16") else "no"


# --- what both sides train on ---------------------------------------------------------------------------------

def load_train_config(path: str):
    """The fine-tune config, checked to be one main.py trains with prior preservation."""
    from omegaconf import OmegaConf
    if not Path(path).is_file():
        raise UserError(f"config not found: {path} (pass --config {DEFAULT_CONFIG})")
    config = load_config(path)
    if OmegaConf.select(config, "data.params.reg") is None:
        raise UserError(f"{path}: has no data.params.reg; the benchmark trains with prior preservation")
    return config


def check_size(config, size: int) -> None:
    multiple = size_multiple(config)
    if size < multiple or size % multiple:
        raise UserError(f"--size {size}: must be a positive multiple of {multiple} for this model (autoencoder and "
                        f"UNet levels); try {max(multiple, size // multiple * multiple)}")


def diffusers_parts(config) -> dict[str, Any]:
    """diffusers' UNet, VAE and scheduler and transformers' CLIP text model of the config's sizes (random weights)."""
    diffusers = import_offline("diffusers")
    import transformers
    from omegaconf import OmegaConf
    params = OmegaConf.to_container(config.model.params, resolve=True)
    dd = params["first_stage_config"]["params"]["ddconfig"]
    if dd["attn_resolutions"]:
        raise UserError("the config's VAE has attention outside its middle block, which diffusers cannot build")
    n = len(dd["ch_mult"])
    return {
        "unet": diffusers.UNet2DConditionModel(**diffusers_unet_config(params["unet_config"]["params"])),
        "vae": diffusers.AutoencoderKL(
            in_channels=dd["in_channels"], out_channels=dd["out_ch"], down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
            layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"], norm_num_groups=32,
            sample_size=dd["resolution"], scaling_factor=params["scale_factor"]),
        "text_encoder": transformers.CLIPTextModel(
            build_text_config((params["cond_stage_config"].get("params") or {}).get("text_config"))),
        "scheduler": diffusers.DDPMScheduler(  # CompVis' "linear" schedule is diffusers' scaled_linear
            num_train_timesteps=params["timesteps"], beta_start=params["linear_start"],
            beta_end=params["linear_end"], beta_schedule="scaled_linear", clip_sample=False),
    }


def diffusers_folder(config, work: Path) -> Path:
    """A diffusers model folder (unet, vae, text_encoder, scheduler) of the config's sizes, random weights, written
    once with save_pretrained."""
    folder = work / f"diffusers-{config_key(config)}"
    if folder.is_dir():
        return folder
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    progress(f"writing a random-weight diffusers model of the same sizes: {folder}")
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, part in diffusers_parts(config).items():
        part.save_pretrained(tmp / name)
    tmp.rename(folder)
    return folder


# --- the runs --------------------------------------------------------------------------------------------------

def our_command(opt: argparse.Namespace, config, ckpt: Path, photos: Path, tokens: list[str], logdir: Path,
                output: Path) -> list[str]:
    """python main.py ... for one set: image logging and step checkpoints off, the StepTimer on."""
    from omegaconf import OmegaConf
    command = [sys.executable, str(REPO / "main.py"), "--base", str(Path(opt.config).resolve()), "-t",
               "--actual_resume", str(ckpt), "--data_root", str(photos / "instance"),
               "--reg_data_root", str(photos / "class"), "--max_steps", str(opt.steps), "-l", str(logdir),
               "-n", "benchmark"]
    command += ["--accelerator", "gpu", "--devices", "1"] if opt.device == "cuda" else ["--accelerator", "cpu"]
    command += ["--freeze_text_encoder"] if opt.freeze_text_encoder else ["model.params.cond_stage_trainable=true"]
    command += ["data.params.batch_size=1", f"data.params.train.params.size={opt.size}",
                f"data.params.reg.params.size={opt.size}", "lightning.modelcheckpoint.params.every_n_train_steps=0",
                "lightning.modelcheckpoint.params.save_last_every_n_steps=0",
                "lightning.callbacks.timer.target=ldm.callbacks.StepTimer",
                f"lightning.callbacks.timer.params.output={output}"]
    if OmegaConf.select(config, "lightning.callbacks.image_logger") is not None:
        command.append("lightning.callbacks.image_logger.params.disabled=true")
    return command + tokens  # the set's last, so that its overrides win


def run_process(command: list[str], log: Path, output: Path, what: str, threads: Optional[int]) -> dict:
    """Run one measured process, its output to `log`; the JSON it wrote to `output`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", START_TIME_ENV: repr(time.time())}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0 or not output.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        for line in lines[-10:]:  # the context of the error line below
            progress(f"  | {line}")
        raise UserError(f"{what}: exited with status {code} without timings: "
                        f"{lines[-1].strip() if lines else 'no output'}")
    return json.loads(output.read_text())


def run_worker(kind: str, spec: dict, work: Path, tag: str, threads: Optional[int]) -> dict:
    """One of this script's worker processes (the reference, or a UNet alone) with `spec`."""
    spec = {**spec, "output": str(work / "measured" / f"{tag}.json"), "start_time": time.time()}
    spec_path = work / "measured" / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path)]
    return run_process(command, spec_path.with_name(f"{tag}.log"), Path(spec["output"]), tag, threads)


def timed_run(label: str, index: int, total: int, run: Callable[[], dict]) -> dict:
    """`run()` with a progress line before it and its wall time and median step after it, on stderr."""
    progress(f"[{index}/{total}] {label}")
    started = time.monotonic()
    result = run()
    progress(f"  {time.monotonic() - started:.1f} s, median {statistics.median(result['steps'][1:]):.3f} s")
    return result


def reference_rows(sets: dict[str, list[str]], flags: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The reference row of each set, and the --mixed_precision of each reference row: the one --reference_flags
    gives, else one reference per precision that the sets train at."""
    reference_of, precision_of = {}, {}
    for name, tokens in sets.items():
        precision = flags.mixed_precision or mixed_precision(tokens)
        reference_of[name] = "diffusers" + ("" if precision == "no" else f" {precision}")
        precision_of[reference_of[name]] = precision
    return reference_of, precision_of


def reference_backend(reference: str, reference_of: dict[str, str], ours: dict[str, dict]) -> dict:
    """The backend flags (TF32, cuDNN autotuning) a reference row runs with: those that the first set compared with
    it recorded in the same repeat, so that both sides of a ratio run with the same."""
    for name, compared in reference_of.items():
        if compared == reference and name in ours:
            return ours[name]["backend"]
    return default_backend()


def train_rows(opt: argparse.Namespace, config, work: Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Every set and reference `repeats` times, taken in turn: the timings by row name, and each set's reference."""
    sets = parse_sets(opt.set)
    flags, unknown = reference_parser().parse_known_args(shlex.split(opt.reference_flags))
    if unknown:
        raise UserError(f"--reference_flags: {' '.join(unknown)} is not among the supported flags of "
                        "train_dreambooth.py (see --help)")
    photos, ckpt = write_photos(work, opt.size), random_checkpoint(config, work)
    reference_of, precision_of = reference_rows(sets, flags) if opt.reference else ({}, {})
    model = diffusers_folder(config, work) if opt.reference else None
    rows: dict[str, list[dict]] = {name: [] for name in [*sets, *precision_of]}

    def ours(name: str, tag: str) -> dict:
        logdir, output = work / "runs" / tag, work / "measured" / f"{tag}.json"
        command = our_command(opt, config, ckpt, photos, sets[name], logdir, output)
        try:
            result = run_process(command, output.with_suffix(".log"), output, f"set {name}", opt.threads)
            saved = sorted(logdir.glob("*/checkpoints/last.ckpt"))  # weights and optimizer state after the last step
            return {**result, "last_ckpt_bytes": saved[0].stat().st_size if saved else None}
        finally:
            shutil.rmtree(logdir, ignore_errors=True)  # with its last.ckpt, written after the timings

    def theirs(name: str, tag: str, backend: dict) -> dict:
        tokens = [*shlex.split(opt.reference_flags), "--mixed_precision", precision_of[name]]
        tokens += [] if opt.freeze_text_encoder else ["--train_text_encoder"]
        spec = {"model": str(model), "flags": tokens, "photos": str(photos), "size": opt.size, "steps": opt.steps,
                "device": opt.device, "backend": backend}
        return run_worker("diffusers", spec, work, tag, opt.threads)

    for k in range(opt.repeats):
        latest: dict[str, dict] = {}
        for i, name in enumerate(rows):  # the sets first: each reference copies its set's backend flags
            tag = f"{''.join(c if c.isalnum() else '_' for c in name)}-{k}"
            run = partial(ours, name, tag) if name in sets else partial(
                theirs, name, tag, reference_backend(name, reference_of, latest))
            latest[name] = timed_run(f"{name}, repeat {k + 1}/{opt.repeats}", k * len(rows) + i + 1,
                                     opt.repeats * len(rows), run)
            rows[name].append(latest[name])
    return rows, reference_of


def unet_rows(opt: argparse.Namespace, config, work: Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Our UNet and diffusers' alone, forward+backward on the same input, in turn `repeats` times."""
    from omegaconf import OmegaConf
    if opt.set or opt.reference_flags:
        raise UserError("--unet_only times the two UNets alone, in fp32: --set and --reference_flags do not apply")
    cond_params = config.model.params.cond_stage_config.get("params") or {}
    spec = {"unet": OmegaConf.to_container(config.model.params.unet_config.params, resolve=True),
            "latent": list(latent_shape(config, opt.size, opt.size)), "steps": opt.steps, "device": opt.device,
            "context_length": cond_params.get("max_length", 77), "backend": default_backend()}
    rows: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for k in range(opt.repeats):
        for i, name in enumerate(rows):
            rows[name].append(timed_run(f"UNet {name}, repeat {k + 1}/{opt.repeats}", 2 * k + i + 1, 2 * opt.repeats,
                                        partial(run_worker, f"unet_{name}", spec, work, f"unet_{name}-{k}",
                                                opt.threads)))
    return rows, {"ours": "diffusers"}


# --- the table -------------------------------------------------------------------------------------------------

def memory_of(result: dict) -> float:
    """CUDA max allocated on a GPU, else the peak RSS (NaN where it is unknown)."""
    for key in ("cuda_max_allocated_bytes", "peak_rss_bytes"):
        if result.get(key) is not None:
            return result[key]
    return float("nan")


def summary(results: list[dict]) -> dict[str, float]:
    """Median and range of steps 2..N over the runs of a row, its largest peak memory and median start-up."""
    steps = [s for result in results for s in result["steps"][1:]]
    startups = [r["startup_s"] for r in results if r["startup_s"] is not None]
    reserved = [r["cuda_max_reserved_bytes"] for r in results if r.get("cuda_max_reserved_bytes") is not None]
    return {"median": statistics.median(steps), "min": min(steps), "max": max(steps),
            "memory": max(memory_of(r) for r in results), "reserved": max(reserved) if reserved else None,
            "startup": statistics.median(startups) if startups else float("nan")}


def print_table(title: str, unit: str, rows: dict[str, list[dict]], reference_of: dict[str, str]) -> None:
    first = next(iter(rows.values()))[0]
    memory = "CUDA alloc/reserved" if first["cuda_max_allocated_bytes"] is not None else "peak RSS"
    print(f"{title}, {first['device']}, torch threads {first['torch_threads']}")
    print(f"{'set':<16} {unit + ' (min-max)':<26} {memory:>19} {'start-up':>9}  {'ratio to diffusers':<26} settings")
    stats = {name: summary(results) for name, results in rows.items()}
    for name, results in rows.items():
        s, ref = stats[name], stats.get(reference_of.get(name, ""))
        ratio = (f"{s['median'] / ref['median']:.2f}x time, {s['memory'] / ref['memory']:.2f}x memory"
                 if ref else "-")
        settings = ", ".join(str(results[0][key]) for key in ("precision", "optimizer") if results[0].get(key))
        if "gradient_checkpointing" in results[0]:
            settings += f", grad ckpt {'on' if results[0]['gradient_checkpointing'] else 'off'}"
        if results[0].get("backend"):
            settings += f", {backend_text(results[0]['backend'])}"
        if results[0].get("last_ckpt_bytes"):
            settings += f", last.ckpt {results[0]['last_ckpt_bytes'] / 1e9:.2f} GB"
        span = f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"
        held = f"{s['memory'] / GiB:.2f}" + (f"/{s['reserved'] / GiB:.2f}" if s["reserved"] is not None else "")
        print(f"{name:<16} {span:<26} {held:>15} GiB {s['startup']:>7.1f} s  {ratio:<26} "
              f"{settings}")


def benchmark(opt: argparse.Namespace) -> None:
    import torch
    if opt.steps < 2 or opt.repeats < 1 or (opt.threads is not None and opt.threads < 1):
        raise UserError(f"need --steps >= 2 (the first warms up), --repeats >= 1, --threads >= 1; got {opt.steps}, "
                        f"{opt.repeats}, {opt.threads}")
    if opt.device == "auto":
        opt.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif opt.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: PyTorch {torch.__version__} sees no CUDA GPU here")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the progress lines of benchmarks.common
    config = load_train_config(opt.config)
    check_size(config, opt.size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(opt.workdir or tmp)
        (work / "measured").mkdir(parents=True, exist_ok=True)  # what each run wrote: its timings, log (and spec)
        if opt.unet_only:
            rows, reference_of = unet_rows(opt, config, work)
            h, w = rows["ours"][0]["latent"][1:]
            title = (f"{opt.config} UNet alone, {opt.size}x{opt.size} (latents {h}x{w}), batch 2, forward+backward,"
                     f" {opt.steps} passes (median of 2..{opt.steps}) x {opt.repeats}")
            print_table(title, "s/pass", rows, reference_of)
            return
        rows, reference_of = train_rows(opt, config, work)
    text = "frozen" if opt.freeze_text_encoder else "trained"
    title = (f"{opt.config} {opt.size}x{opt.size}, batch 1 instance + 1 class (prior preservation), text encoder "
             f"{text}, {opt.steps} steps (median of 2..{opt.steps}) x {opt.repeats}")
    print_table(title, "s/step", rows, reference_of)


# --- the worker processes --------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    if opt.worker:
        spec = json.loads(Path(opt.spec).read_text())
        Path(spec["output"]).write_text(json.dumps(WORKERS[opt.worker](spec), indent=1))
        return 0
    return run_command(lambda: benchmark(opt))


if __name__ == "__main__":
    sys.exit(main())
