"""Compare models fairly: the same prompts, seeds, batch and sampler for each; one labelled picture and one table.

    python scripts/compare.py --model base=sd-v1-5.ckpt --model full=logs/<run1>/checkpoints/step_800.ckpt \\
        --model r8=sd-v1-5.ckpt+logs/<run2>/checkpoints/last.safetensors --class_word dog
    python scripts/compare.py --scorer toy --config configs/toy/v1-inference.yaml \\
        --model base=data/toy/toy-v1.safetensors --model r8=data/toy/toy-v1.safetensors+<run>/last.safetensors
    python scripts/compare.py --model ti=sd-v1-5.ckpt+logs/<ti>/checkpoints/last.safetensors:sks \\
        --model pivotal=sd-v1-5.ckpt+<pivotal>/last.safetensors+<pivotal>/last.embedding.safetensors:sks

A model is `[LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]...`: each +FILE a LoRA (at SCALE) or a textual-inversion
embedding (bound to WORD, after any --embedding), told apart by its content. Writes to --outdir: grid.png (rows:
models, columns: prompts, the first 4 images of each cell), samples/<label>/ (every image with its metadata), table.md
and table.csv (trainable parameters, file size, and the training run's s/step and peak memory from its summary.json;
with --scorer, subject and prompt fidelity over all --n images).
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import run_command  # noqa: E402
from ldm.embeddings.files import check_embedding_specs  # noqa: E402
from ldm.eval.compare import (ModelSpec, Scorer, cost_row, default_prompts, draw_comparison, percent,  # noqa: E402
                              table_rows, unique_labels, write_tables)
from ldm.eval.generation import SampleSettings, model_config, sample_model  # noqa: E402
from ldm.inference.flags import add_precision_argument, read_prompts  # noqa: E402
from ldm.inference.loading import check_checkpoint, choose_device  # noqa: E402
from ldm.toy.demo import CLASS_PROMPT, CONTEXT_PROMPTS  # noqa: E402
from ldm.toy.scorer import ToyPromptScorer, load_scorer  # noqa: E402
from ldm.util import UserError, ensure_writable_dir, mean, user_or_project_path  # noqa: E402

logger = logging.getLogger("compare")
TOY_SCORER = "data/toy/scorer.safetensors"
PER_CELL = 4  # images of a cell in the picture (2 x 2); the scores count all --n


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", action="append", required=True, metavar="[LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]",
        help="a model (repeat)")
    add("--prompts", default=None, help="a prompt file, one per line (default: the subject in five surroundings and "
        "the bare class prompt; with --scorer toy, the toy world's)")
    add("--identifier", default="sks")
    add("--class_word", default=None, help="default: dog (ball with --scorer toy)")
    add("--seed", type=int, default=1000, help="the first seed; image k of every prompt and model has seed + k")
    add("--n", type=int, default=4, help="images per prompt and model")
    add("--steps", type=int, default=25, help="DDIM steps")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    add("--use_ema", action="store_true", help="sample every model with its EMA UNet (model_ema.*)")
    add("--H", type=int, default=None, help="image height (default: the config's native size)")
    add("--W", type=int, default=None, help="image width (default: the config's native size)")
    add("--config", type=user_or_project_path, default=None, help="model config for every model (default: each "
        "checkpoint's run config, else the SD v1 inference config)")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    add_precision_argument(parser)
    add("--embedding", action="append", default=[], metavar="FILE[:WORD]", help="a textual-inversion embedding "
        "bound in every model (docs/embeddings.md); repeatable")
    add("--scorer", choices=["none", "toy"], default="none", help="toy: the toy world's scorer")
    add("--scorer_path", type=user_or_project_path, default=TOY_SCORER, help="the toy scorer's weights")
    add("--outdir", default="outputs/compare")
    return parser.parse_args(argv)


def prompts_of(opt: argparse.Namespace) -> list[str]:
    """--prompts, else the toy world's prompts with --scorer toy, else the subject in five surroundings."""
    if opt.prompts:
        return read_prompts(None, opt.prompts)
    if opt.scorer == "toy":
        return [*CONTEXT_PROMPTS, CLASS_PROMPT]
    return default_prompts(opt.identifier, opt.class_word or "dog")


def make_scorer(opt: argparse.Namespace) -> Optional[Scorer]:
    """The scorer of --scorer, or None."""
    if opt.scorer == "none":
        return None
    if not Path(opt.scorer_path).is_file():
        raise UserError(f"--scorer_path {opt.scorer_path}: not found (the toy scorer is data/toy/scorer.safetensors)")
    return ToyPromptScorer(load_scorer(opt.scorer_path), opt.class_word or "ball")


def settings_of(opt: argparse.Namespace) -> SampleSettings:
    """The sampling settings every model shares."""
    return SampleSettings(list(range(opt.seed, opt.seed + opt.n)), opt.steps, opt.scale, opt.H, opt.W, opt.config,
                          use_ema=opt.use_ema, precision=opt.precision, embeddings=opt.embedding)


def compare(opt: argparse.Namespace) -> str:
    """Sample every model in turn, then write grid.png, table.md and table.csv; returns the markdown table."""
    specs = [ModelSpec.parse(text) for text in opt.model]
    unique_labels(specs)
    check_embedding_specs(opt.embedding)
    for spec in specs:
        check_checkpoint(spec.ckpt, "--model")
        model_config(spec, settings_of(opt))  # a bad config or size stops the run before any model is sampled
    if opt.n < 1 or opt.steps < 1:
        raise UserError("--n and --steps must be at least 1")
    ensure_writable_dir(opt.outdir, "--outdir")
    outdir, prompts, device, scorer = Path(opt.outdir), prompts_of(opt), choose_device(opt.device), make_scorer(opt)
    images, costs, scores = {}, [], {}
    for spec in specs:
        images[spec.label] = sample_model(spec, settings_of(opt), prompts, device, outdir / "samples" / spec.label)
        costs.append(cost_row(spec))
        if scorer is not None:
            scores[spec.label] = {p: scorer(images[spec.label][p], p) for p in prompts}
    captions = {(label, p): "subject {} · prompt {}".format(*(percent(mean([s[key] for s in cell]))
                                                               for key in ("subject", "prompt")))
                for label, by_prompt in scores.items() for p, cell in by_prompt.items()}
    shown = {label: {p: cell[:PER_CELL] for p, cell in by_prompt.items()} for label, by_prompt in images.items()}
    draw_comparison(shown, prompts, captions or None, zoom=2 if opt.scorer == "toy" else 1).save(outdir / "grid.png")
    markdown = write_tables(table_rows(costs, scores, prompts, opt.identifier), outdir)
    return markdown + f"\npicture: {outdir / 'grid.png'}; tables: {outdir / 'table.md'}, {outdir / 'table.csv'}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the comparison; a user error is one `error:` line and exit status 1."""
    opt = parse_args(argv)
    return run_command(lambda: compare(opt))


if __name__ == "__main__":
    sys.exit(main())
