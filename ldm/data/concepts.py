"""Several subjects, and several resolutions, in one run.

`data.params.concepts` lists the subjects: each has its photos, identifier, class word, class folder and repeats,
and the `train` and `reg` dataset configs give everything else (size, flips, crop, captions). Each concept's
instance examples are paired with class examples of its own class folder; concepts that share a class folder share
its dataset. `data.params.resolutions` trains every concept (and its class images) at each of several sizes.
Without either key the run has one concept, built from `train` and `reg` as they are."""
import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ldm.data.batch import CONCEPT_KEY, PRIOR_CAPTION_KEY, with_class_example
from ldm.data.image_files import DataError
from ldm.data.personalized import DEFAULT_IDENTIFIER, class_image_folder

CONCEPT_KEYS = {"data_root", "identifier", "class_word", "reg_data_root", "repeats", "class_repeats", "name"}


@dataclass
class ConceptConfig:
    """One concept's dataset configs: `train` for its photos, `reg` (None without prior preservation) for its class
    images."""
    name: str
    train: Mapping
    reg: Optional[Mapping]


@dataclass
class Concept:
    """One concept's datasets; `class_prior` may be shared with other concepts of the same class folder."""
    name: str
    instance: Dataset
    class_prior: Optional[Dataset]


def with_params(config: Mapping, **params: Any) -> Mapping:
    """A dataset config with some of its params replaced (the given ones that are not None)."""
    merged = OmegaConf.merge(config, {})
    if merged.get("params") is None:
        merged.params = {}
    for key, value in params.items():
        if value is not None:
            merged.params[key] = value
    return merged


def concept_configs(train: Mapping, reg: Optional[Mapping], concepts: Optional[Sequence[Mapping]] = None,
                    resolutions: Optional[Sequence[int]] = None) -> list[ConceptConfig]:
    """The concepts of a run: one per entry of `concepts` (or the single one of `train`/`reg`), at each of
    `resolutions` (named `<name>@<size>` when there are several). A class folder whose images are all in its
    `samples/` subfolder (as scripts/stable_txt2img.py writes them) stands for that subfolder."""
    if concepts is not None and not concepts:
        raise DataError("data.params.concepts is empty: list the subjects, or remove the key")
    entries = [dict(entry) for entry in concepts] if concepts else [{}]
    for index, entry in enumerate(entries):
        unknown = sorted(set(entry) - CONCEPT_KEYS)
        if unknown:
            raise DataError(f"data.params.concepts[{index}]: unknown keys {unknown}; a concept has "
                            f"{', '.join(sorted(CONCEPT_KEYS))}")
        if concepts and not entry.get("data_root"):
            raise DataError(f"data.params.concepts[{index}] has no data_root (the folder of its photos)")
        if concepts and reg is not None and not entry.get("reg_data_root"):
            raise DataError(f"data.params.concepts[{index}] has no reg_data_root (its class images); or set "
                            "data.params.reg=null to train without prior preservation")
    roots = [str(Path(entry["data_root"]).resolve()) for entry in entries if concepts]
    for index, root in enumerate(roots):
        if root in roots[:index]:
            raise DataError(f"data.params.concepts[{roots.index(root)}] and [{index}] train on the same photos "
                            f"({entries[index]['data_root']}; --data_root given twice?): one folder is one subject, "
                            "with one identifier")
    train_params = OmegaConf.create(train).get("params") or {}
    names = [entry.get("name") or entry.get("identifier") or train_params.get("identifier") or DEFAULT_IDENTIFIER
             for entry in entries]
    if len(set(names)) < len(names):
        raise DataError(f"the concepts' names repeat ({', '.join(names)}): give each concept its own identifier "
                        "(--token), or a name")
    sizes = list(resolutions) if resolutions else [None]
    if resolutions and (any(not isinstance(size, int) or size < 8 for size in sizes) or len(set(sizes)) < len(sizes)):
        raise DataError(f"data.params.resolutions must be distinct sizes of at least 8 pixels, got {list(sizes)}")
    reg_root = None if reg is None else (OmegaConf.create(reg).get("params") or {}).get("data_root")
    class_folders: dict[str, str] = {}
    result = []
    for entry, name in zip(entries, names):
        class_root = entry.get("reg_data_root") or reg_root
        if reg is not None and class_root and str(class_root) not in class_folders:
            class_folders[str(class_root)] = class_image_folder(str(class_root))
        for size in sizes:
            shared = {"size": size, "class_word": entry.get("class_word")}
            result.append(ConceptConfig(
                name=name if size is None or len(sizes) == 1 else f"{name}@{size}",
                train=with_params(train, data_root=entry.get("data_root"), identifier=entry.get("identifier"),
                                  repeats=entry.get("repeats"), **shared),
                reg=None if reg is None else with_params(reg, data_root=class_folders.get(str(class_root)),
                                                         repeats=entry.get("class_repeats"), **shared)))
    return result


def class_set_key(config: Mapping) -> tuple:
    """What makes two concepts' class datasets the same: their resolved params (the folder resolved)."""
    params = dict(OmegaConf.to_container(OmegaConf.create(config), resolve=True).get("params") or {})
    if params.get("data_root"):
        params["data_root"] = str(Path(params["data_root"]).resolve())
    return tuple(sorted((key, repr(value)) for key, value in params.items()))


class ConceptPairs(Dataset):
    """The instance examples of every concept in turn, each with a class example of its own concept (as
    `class_image`, `class_caption`, ...; none without prior preservation), or with `prior_prompts` (one per
    concept: prior preservation by the frozen model) with its concept's class prompt as `prior_caption`; with
    several concepts each item also names its `concept`. With one concept this is the original DreamBooth trainer's
    pairing."""

    def __init__(self, concepts: Sequence[Concept], prior_prompts: Optional[Sequence[str]] = None):
        self.concepts = list(concepts)
        self.prior_prompts = None if prior_prompts is None else list(prior_prompts)
        self.starts = [0]
        for concept in self.concepts:
            self.starts.append(self.starts[-1] + len(concept.instance))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(concept index, index within its instance set) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        c = bisect.bisect_right(self.starts, index) - 1
        return c, index - self.starts[c]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Item `index`, or with bucketed batches (ldm/data/buckets.py) the pair (item index, class index)."""
        index, class_index = index if isinstance(index, tuple) else (index, None)
        c, local = self.locate(index)
        concept = self.concepts[c]
        example = dict(concept.instance[local])
        if concept.class_prior is not None:
            prior = concept.class_prior[local % len(concept.class_prior) if class_index is None else class_index]
            example = with_class_example(example, prior)
        if self.prior_prompts is not None:
            example[PRIOR_CAPTION_KEY] = self.prior_prompts[c]
        if len(self.concepts) > 1:
            example[CONCEPT_KEY] = concept.name
        return example


def concepts_from_flags(flags: Mapping[str, Optional[Sequence[str]]]) -> list[dict[str, str]]:
    """The concept list of repeated command-line flags (`--data_root` once per subject; `--token` once per subject;
    `--class_word` and `--reg_data_root` once per subject, or once for all)."""
    roots = list(flags["data_root"] or [])
    concepts = [{"data_root": root} for root in roots]
    for key, flag in (("identifier", "--token"), ("class_word", "--class_word"), ("reg_data_root", "--reg_data_root")):
        values = list(flags[key] or [])
        if key == "identifier" and len(values) != len(roots):
            raise DataError(f"{len(roots)} subjects (--data_root) need as many identifiers: pass --token once after "
                            f"each --data_root (got {len(values)})")
        if len(values) not in (0, 1, len(roots)):
            raise DataError(f"{flag} given {len(values)} times for {len(roots)} subjects (--data_root): give it once "
                            "for all of them or once per subject")
        for concept, value in zip(concepts, values * len(roots) if len(values) == 1 else values):
            concept[key] = value
    return concepts
