"""Evaluate DreamBooth models by the paper's protocol (DINO, CLIP-I, CLIP-T on DreamBench's prompts), or a toy-world
model with the toy scorer, through the same outputs.

    python scripts/evaluate.py --model logs/<run>/checkpoints/last.ckpt --photos photos/ --class_word dog \\
        --subject_type live --clip models/clip-vit-base-patch32 --dino models/dino-vits16
    python scripts/evaluate.py --subjects_root dreambooth/dataset --model "logs/*_{subject}/checkpoints/last.ckpt" \\
        --clip models/clip-vit-base-patch32 --dino models/dino-vits16
    python scripts/evaluate.py --scorer toy --config configs/toy/v1-inference.yaml --model <toy run>/last.ckpt

A model is `[LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]...` as in compare.py; with --subjects_root, `{subject}` in
it is each subject's folder name (a `*` picks the last match in name order). Writes to --outdir (default: <run>/eval/
for a checkpoint in a run's checkpoints/ folder, else outputs/eval/): samples/, images.csv, prompts.csv,
summary.json, grid-<group>.png, and with several subjects one folder each and table.md (the layout of the paper's
Table 1).
"""
import argparse
import glob
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import run_command  # noqa: E402
from ldm.data.image_files import DataError, load_rgb  # noqa: E402
from ldm.data.personalized import list_images  # noqa: E402
from ldm.embeddings.files import check_embedding_specs  # noqa: E402
from ldm.eval.compare import ModelSpec, Scorer  # noqa: E402
from ldm.eval.evaluate import Subject, evaluate_subject, paper_table, subject_class, subject_kind  # noqa: E402
from ldm.eval.generation import SampleSettings, model_config  # noqa: E402
from ldm.eval.paper_metrics import PaperScorer  # noqa: E402
from ldm.inference.flags import add_precision_argument, read_prompts  # noqa: E402
from ldm.inference.loading import check_checkpoint, choose_device  # noqa: E402
from ldm.modules.encoders.vision import ClipEmbedder, DinoEmbedder, check_model_folder  # noqa: E402
from ldm.toy.demo import context_prompts  # noqa: E402
from ldm.toy.scorer import ToyPromptScorer, load_scorer  # noqa: E402
from ldm.util import UserError, atomic_write_text, ensure_writable_dir, user_or_project_path  # noqa: E402

logger = logging.getLogger("evaluate")
TOY_SCORER = "data/toy/scorer.safetensors"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", required=True, metavar="[LABEL=]CKPT[+LORA[:SCALE]][+EMBEDDING[:WORD]]",
        help="the model ({subject}: see above)")
    add("--photos", default=None, help="the subject's real photos (a folder)")
    add("--subjects_root", default=None, help="a folder of subject folders (DreamBench's dataset/ layout)")
    add("--subjects", nargs="*", default=None, help="with --subjects_root: only these subjects")
    add("--class_word", default=None, help="default: DreamBench's class of the subject (ball with --scorer toy)")
    add("--identifier", default="sks")
    add("--subject_type", choices=["object", "live"], default=None,
        help="which DreamBench prompt list (default: live for DreamBench's cats and dogs, else object)")
    add("--prompts", default=None, help="a prompt file instead of DreamBench's (one per line)")
    add("--n", type=int, default=4, help="images per prompt")
    add("--seed", type=int, default=0, help="the first seed; image k of every prompt has seed + k")
    add("--steps", type=int, default=50, help="DDIM steps")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    add("--use_ema", action="store_true", help="sample every model with its EMA UNet (model_ema.*)")
    add("--batch", type=int, default=2, help="images per sampler call (more is faster on a large GPU)")
    add("--H", type=int, default=None, help="image height (default: the config's native size)")
    add("--W", type=int, default=None, help="image width (default: the config's native size)")
    add("--config", type=user_or_project_path, default=None,
        help="model config (default: the checkpoint's run config, else SD v1's)")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    add_precision_argument(parser)
    add("--embedding", action="append", default=[], metavar="FILE[:WORD]", help="a textual-inversion embedding "
        "bound in every model (docs/embeddings.md); repeatable")
    add("--scorer", choices=["paper", "toy"], default="paper", help="paper: DINO, CLIP-I, CLIP-T; toy: the toy world's")
    add("--clip", default=None, help="a local CLIP ViT-B/32 folder (transformers format)")
    add("--dino", default=None, help="a local DINO ViT-S/16 folder (transformers format)")
    add("--scorer_path", type=user_or_project_path, default=TOY_SCORER, help="the toy scorer's weights")
    add("--outdir", default=None)
    return parser.parse_args(argv)


def resolve_model(text: str, subject: str) -> ModelSpec:
    """The model spec with `{subject}` filled in and a `*` resolved to the last match in name order."""
    def last_match(path: str) -> str:
        matches = sorted(glob.glob(path)) if "*" in path else [path]
        if not matches:
            raise UserError(f"--model {text}: nothing matches {path}")
        return matches[-1]

    spec = ModelSpec.parse(text.replace("{subject}", subject), resolve=last_match)
    check_checkpoint(spec.ckpt, "--model")
    return spec


def read_photos(folder: str) -> list:
    """The subject's real photos as RGB images."""
    try:
        return [load_rgb(path) for path in list_images(folder)]
    except DataError as err:
        raise UserError(str(err)) from None


def subjects_of(opt: argparse.Namespace) -> list[Subject]:
    """The subjects to evaluate, each with its model, photos, class word and kind."""
    prompts = read_prompts(None, opt.prompts) if opt.prompts else None
    if opt.scorer == "toy":
        class_word = opt.class_word or "ball"
        return [Subject("toy", resolve_model(opt.model, "toy"), [], class_word,
                        prompts=prompts or list(context_prompts(opt.identifier, class_word)))]  # as DreamBench's
    if opt.subjects_root:
        root = Path(opt.subjects_root)
        if not root.is_dir():
            raise UserError(f"--subjects_root {root}: not a folder")
        names = opt.subjects or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        folders = {name: root / name for name in names}
    elif opt.photos:
        folders = {Path(opt.photos).resolve().name: Path(opt.photos)}
    else:
        raise UserError("pass the subject's real photos with --photos (or --subjects_root for several subjects)")
    return [Subject(name, resolve_model(opt.model, name), read_photos(str(folder)), subject_class(name, opt.class_word),
                    subject_kind(name, opt.subject_type), prompts) for name, folder in folders.items()]


def default_outdir(spec: ModelSpec) -> Path:
    """<run>/eval for a checkpoint in a run's checkpoints/ folder, else outputs/eval."""
    ckpt = spec.files()[-1]
    return ckpt.parent.parent / "eval" if ckpt.parent.name == "checkpoints" else Path("outputs/eval")


def scorer_factory(opt: argparse.Namespace, device) -> Callable[[Subject], Scorer]:
    """A function giving each subject its scorer; the CLIP and DINO models are loaded once."""
    if opt.scorer == "toy":
        if not Path(opt.scorer_path).is_file():
            raise UserError(f"--scorer_path {opt.scorer_path}: not found (the toy scorer is {TOY_SCORER})")
        toy = load_scorer(opt.scorer_path)
        return lambda subject: ToyPromptScorer(toy, subject.class_word)
    clip, dino = ClipEmbedder(opt.clip, device), DinoEmbedder(opt.dino, device)
    return lambda subject: PaperScorer(clip, dino, subject.photos, opt.identifier)


def evaluate(opt: argparse.Namespace) -> str:
    """Evaluate every subject; returns the table."""
    if opt.n < 1 or opt.steps < 1 or opt.batch < 1:
        raise UserError("--n, --steps and --batch must be at least 1")
    if opt.scorer == "paper":
        for folder, kind, flag in ((opt.clip, "clip", "--clip"), (opt.dino, "dino", "--dino")):
            if folder is None:
                raise UserError(f"the paper's metrics need {flag} FOLDER ({kind}); or --scorer toy for a toy model")
            check_model_folder(folder, kind, flag)
    subjects = subjects_of(opt)
    check_embedding_specs(opt.embedding)
    settings = SampleSettings(list(range(opt.seed, opt.seed + opt.n)), opt.steps, opt.scale, opt.H, opt.W,
                              opt.config, opt.batch, opt.use_ema, opt.precision, embeddings=opt.embedding)
    for subject in subjects:
        model_config(subject.model, settings)  # a bad config or size stops before any sampling
    outdir = Path(opt.outdir) if opt.outdir else default_outdir(subjects[0].model)
    ensure_writable_dir(str(outdir), "--outdir")
    device, summaries = choose_device(opt.device), []
    scorer_of = scorer_factory(opt, device)
    for subject in subjects:
        folder = outdir / subject.name if len(subjects) > 1 else outdir
        summaries.append(evaluate_subject(subject, settings, opt.identifier, scorer_of(subject), device, folder))
        logger.info("%s: %s", subject.name, summaries[-1]["scores"])
    metrics = ("dino", "clip_i", "clip_t") if opt.scorer == "paper" else ("subject_fidelity", "prompt_fidelity")
    table = paper_table(summaries, metrics)
    atomic_write_text(outdir / "table.md", table)
    return table + f"\noutputs: {outdir}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the evaluation; a user error is one `error:` line and exit status 1."""
    opt = parse_args(argv)
    return run_command(lambda: evaluate(opt))


if __name__ == "__main__":
    sys.exit(main())
