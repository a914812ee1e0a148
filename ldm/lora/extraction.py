"""A LoRA from a fine-tune and its base, or a LoRA file at a lower rank, by truncated SVD: each module's weight
difference D is replaced by its best rank-r approximation in the Frobenius norm (Eckart-Young), factored into kohya's
`lora_up` U_r S_r^1/2 [out, r] and `lora_down` S_r^1/2 V_r^T [r, in] with alpha = r (scale 1). The error is
sqrt(sum of the discarded sigma^2). Convs are flattened to [out, in * k * k]: a 3x3 conv's down is [r, in, 3, 3] and
its up [out, r, 1, 1] (LoCon). The command is scripts/extract_lora.py."""
import json
import logging
import statistics
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from ldm.lora.layers import group_modules, lora_delta
from ldm.lora.networks import ALPHA, DOWN, UP
from ldm.lora.names import LoraNames
from ldm.util import UserError

logger = logging.getLogger(__name__)

ZERO = 1e-6  # a module whose difference is below this fraction of its weight (in norm) is unchanged: left out
GROUPS = {"down_blocks": "UNet input blocks", "input_blocks": "UNet input blocks", "mid_block": "UNet middle block",
          "middle_block": "UNet middle block", "up_blocks": "UNet output blocks", "output_blocks": "UNet output blocks"}
TEXT_ENCODER, OTHER = "text encoder", "other modules"


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps: a fixed `rank`, or the fewest whose squares keep the fraction `energy`
    of the sum of all squares (at most `max_rank`)."""

    rank: Optional[int] = None
    energy: Optional[float] = None
    max_rank: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise UserError("give one of --rank N (the same rank for every module) and --energy E (per module, the "
                            "smallest rank that keeps the fraction E of the difference's squared singular values)")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"--rank {self.rank}: expected a positive integer (4, 8 and 16 are usual)")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UserError(f"--energy {self.energy:g}: expected a fraction above 0 and at most 1, e.g. 0.9")
        if self.max_rank is not None and self.rank is not None:
            raise UserError("--max_rank caps the ranks that --energy chooses; with --rank it has no use")
        if self.max_rank is not None and self.max_rank < 1:
            raise UserError(f"--max_rank {self.max_rank}: expected a positive integer")

    @property
    def dynamic(self) -> bool:
        """Whether each module gets its own rank."""
        return self.energy is not None

    def choose(self, sigma: torch.Tensor) -> int:
        """The rank to keep of the singular values `sigma` (in descending order)."""
        if self.rank is not None:
            return min(self.rank, len(sigma))
        cumulative = torch.cumsum(sigma.double() ** 2, 0)
        rank = int(torch.searchsorted(cumulative, self.energy * cumulative[-1])) + 1
        return min(rank, len(sigma), self.max_rank or len(sigma))

    def describe(self) -> str:
        """"rank 8" or "energy 0.9, max rank 64", for the file's metadata."""
        if self.rank is not None:
            return f"rank {self.rank}"
        return f"energy {self.energy:g}" + (f", max rank {self.max_rank}" if self.max_rank else "")


def module_group(kohya: str) -> str:
    """The group a kohya module name reports under: UNet input, middle or output blocks, or the text encoder."""
    if kohya.startswith("lora_te"):
        return TEXT_ENCODER
    body = kohya.removeprefix("lora_unet_")
    return next((group for start, group in GROUPS.items() if body.startswith(start)), OTHER)


@dataclass
class GroupReport:
    """A module group's ranks and squared Frobenius norms: of the differences, of what the kept singular values hold,
    and of the error of the factors as written (after the cast to the file's precision)."""

    ranks: list[int] = field(default_factory=list)
    total: float = 0.0
    kept: float = 0.0
    error: float = 0.0
    unchanged: int = 0

    def line(self, name: str) -> str:
        """"UNet input blocks: 16 modules, rank 4, energy kept 91.20 %, relative error 0.2966"."""
        if not self.ranks:
            return f"{name}: unchanged ({self.unchanged} modules left out)"
        low, high = min(self.ranks), max(self.ranks)
        ranks = f"rank {low}" if low == high else f"ranks {low}-{high} (mean {statistics.mean(self.ranks):.1f})"
        text = (f"{name}: {len(self.ranks)} modules, {ranks}, energy kept {100 * self.kept / self.total:.2f} %, "
                f"relative error {(self.error / self.total) ** 0.5:.4f}")
        return text + (f"; {self.unchanged} unchanged modules left out" if self.unchanged else "")


def truncated_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U, S, V^T of a 2-D float32 matrix (exact, on its device)."""
    return torch.linalg.svd(matrix, full_matrices=False)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of up @ down ([out, r] @ [r, in]) from the r x r core of their QR factors: exact, and
    O((out + in) r^2) instead of an SVD of the [out, in] product."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, sigma, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, sigma, vh @ q_down.T


@dataclass
class Extraction:
    """The kohya tensors of the LoRA being built, and per group what its factors keep."""

    dtype: torch.dtype = torch.float32
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, GroupReport] = field(default_factory=dict)

    def group(self, kohya: str) -> GroupReport:
        """The report of the group of module `kohya`."""
        return self.groups.setdefault(module_group(kohya), GroupReport())

    def add(self, kohya: str, delta: torch.Tensor, svd: Sequence[torch.Tensor], rule: RankRule,
            shape: Sequence[int]) -> None:
        """Keep the rank `rule` chooses of the SVD of `delta` (a module's difference [out, in * k * k]) as the
        tensors of module `kohya`, whose weight has `shape`."""
        u, sigma, vh = svd
        rank = rule.choose(sigma)
        root = sigma[:rank].sqrt()
        up, down = (u[:, :rank] * root).to(self.dtype), (root[:, None] * vh[:rank]).to(self.dtype)
        error = delta - up.float() @ down.float()
        if len(shape) == 4:
            up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
        self.tensors.update({f"{kohya}.{DOWN}": down.contiguous(), f"{kohya}.{UP}": up.contiguous(),
                             f"{kohya}.{ALPHA}": torch.tensor(float(rank))})
        report = self.group(kohya)
        report.ranks.append(rank)
        report.total += float(sigma.double().square().sum())
        report.kept += float(sigma[:rank].double().square().sum())
        report.error += float(error.double().square().sum())

    def lines(self) -> list[str]:
        """One line per module group (UNet input, middle, output blocks, text encoder), then one for all."""
        order = [*dict.fromkeys(GROUPS.values()), TEXT_ENCODER, OTHER]
        lines = [self.groups[name].line(name) for name in order if name in self.groups]
        if len(lines) > 1:
            reports = self.groups.values()
            total = GroupReport([r for report in reports for r in report.ranks], sum(r.total for r in reports),
                                sum(r.kept for r in reports), sum(r.error for r in reports),
                                sum(r.unchanged for r in reports))
            lines.append(total.line("all"))
        return lines

    def metadata(self, rule: RankRule) -> dict[str, str]:
        """kohya's metadata of the file: the largest rank as ss_network_dim and ss_network_alpha (alpha = rank in
        every module: scale 1), and in ss_network_args the rule when ranks are per module and LoCon's conv_dim."""
        top = max(rank for report in self.groups.values() for rank in report.ranks)
        args = {"dynamic": rule.describe()} if rule.dynamic else {}
        if any(v.ndim == 4 and v.shape[2:] != (1, 1) for k, v in self.tensors.items() if k.endswith(DOWN)):
            args.update(conv_dim=str(top), conv_alpha=str(float(top)))
        metadata = {"ss_network_dim": str(top), "ss_network_alpha": str(float(top))}
        return {**metadata, "ss_network_args": json.dumps(args)} if args else metadata


def _difference(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """tuned - base in float32, both rounded first to the coarser of their precisions (so that a module that an fp16
    fine-tune of an fp32 base left alone differs by nothing)."""
    if base.dtype != tuned.dtype and base.is_floating_point() and tuned.is_floating_point():
        coarse = max(base.dtype, tuned.dtype, key=lambda dtype: torch.finfo(dtype).eps)
        base, tuned = base.to(coarse), tuned.to(coarse)
    return tuned.float() - base.float()


def changed_modules(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], modules: Sequence[str],
                    sources: tuple[str, str]) -> list[str]:
    """The modules whose weights the fine-tune changed, refusing a pair that are not a fine-tune and its base
    (missing modules, other shapes, differences larger than the weights in most modules) or that are equal."""
    tuned_source, base_source = sources
    missing = [name for name in modules if f"{name}.weight" not in tuned]
    if missing:
        raise UserError(f"{tuned_source} lacks {len(missing)} of the {len(modules)} modules a LoRA can hold (e.g. "
                        f"{missing[0]}): it is not a fine-tune of {base_source}")
    shapes = [name for name in modules if tuned[f"{name}.weight"].shape != base[f"{name}.weight"].shape]
    if shapes:
        name = shapes[0]
        raise UserError(f"{tuned_source} and {base_source} are not a fine-tune and its base: {len(shapes)} of the "
                        f"{len(modules)} modules differ in shape (e.g. {name}: {tuple(tuned[f'{name}.weight'].shape)}"
                        f" vs {tuple(base[f'{name}.weight'].shape)})")
    ratios = {}
    for name in modules:
        weight = base[f"{name}.weight"]
        change, size = float(_difference(weight, tuned[f"{name}.weight"]).norm()), float(weight.float().norm())
        ratios[name] = change / size if size else (0.0 if change == 0 else float("inf"))
    far = sum(ratio > 1 for ratio in ratios.values())
    if far > len(modules) / 2:
        raise UserError(f"{tuned_source} and {base_source} are not a fine-tune and its base: the difference is larger "
                        f"than the base weight in {far} of the {len(modules)} modules (median relative norm "
                        f"{statistics.median(ratios.values()):.2f}); pass the checkpoint it was fine-tuned from")
    changed = [name for name, ratio in ratios.items() if ratio > ZERO]
    if not changed:
        raise UserError(f"{tuned_source} equals {base_source} in all {len(modules)} modules a LoRA can hold: "
                        "nothing to extract")
    return changed


def extract_lora(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], names: LoraNames,
                 modules: Sequence[str], rule: RankRule, dtype: torch.dtype = torch.float32,
                 sources: tuple[str, str] = ("the fine-tune", "the base")) -> Extraction:
    """The LoRA (kohya tensors in `dtype`) of `tuned` - `base` over `modules` (our module names, each with a
    `.weight` in both state dicts); unchanged modules are left out and counted."""
    changed = set(changed_modules(base, tuned, modules, sources))
    extraction = Extraction(dtype)
    for group, members in _by_group({names.kohya(name): name for name in modules}).items():
        logger.info("%s: factoring %d modules", group, sum(name in changed for name in members.values()))
        for kohya, name in members.items():
            if name not in changed:
                extraction.group(kohya).unchanged += 1
                continue
            weight = base[f"{name}.weight"]
            delta = _difference(weight, tuned[f"{name}.weight"]).flatten(1)
            extraction.add(kohya, delta, truncated_svd(delta), rule, weight.shape)
    return extraction


def _by_group(items: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """`items` keyed by kohya module name, split by module group in their order."""
    groups: dict[str, dict[str, object]] = {}
    for kohya, value in items.items():
        groups.setdefault(module_group(kohya), {})[kohya] = value
    return groups


def resize_lora(tensors: Mapping[str, torch.Tensor], rule: RankRule, dtype: torch.dtype = torch.float32,
                source: str = "the LoRA file") -> Extraction:
    """A kohya LoRA (or LoCon) file's tensors at the ranks `rule` chooses: each module's up @ down * alpha / r
    refactored by SVD (exact where the new rank is at least the old); modules that are zero are left out."""
    modules = group_modules(tensors)
    others = {name: sorted(parts) for name, parts in modules.items()
              if DOWN not in parts or UP not in parts or set(parts) - {DOWN, UP, ALPHA}}
    if others:
        name = next(iter(others))
        raise UserError(f"{source}: {len(others)} of its {len(modules)} modules are not plain LoRA (e.g. {name}: "
                        f"{', '.join(others[name])}); --resize takes kohya LoRA and LoCon files (lora_down, lora_up, "
                        "alpha)")
    extraction = Extraction(dtype)
    for group, members in _by_group(modules).items():
        logger.info("%s: resizing %d modules", group, len(members))
        for kohya, parts in members.items():
            shape = (parts[UP].shape[0], *parts[DOWN].shape[1:])
            delta = lora_delta(parts, torch.Size(shape), kohya, source).flatten(1)
            if not delta.any():
                extraction.group(kohya).unchanged += 1
                continue
            rank = parts[DOWN].shape[0]
            scale = float(parts[ALPHA]) / rank if ALPHA in parts else 1.0
            svd = svd_of_product(parts[UP].float().flatten(1) * scale, parts[DOWN].float().flatten(1))
            extraction.add(kohya, delta, svd, rule, shape)
    if not extraction.tensors:
        raise UserError(f"{source}: every module is zero (an untrained LoRA?): nothing to resize")
    return extraction
