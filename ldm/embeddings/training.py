"""Textual inversion (Gal et al. 2022, arXiv:2208.01618) and pivotal tuning of a LatentDiffusion: N new vectors
for the identifier, initialised from a word's token embeddings, trained alone (the UNet and the text encoder frozen)
or beside the UNet or its LoRA, at their own learning rate until their own stop step. Step files are A1111-format
embedding files; a textual-inversion run's last.ckpt holds the vectors only. With `use_ema` the EMA averages the
vectors beside what else trains: the embedding files hold the average, last.ckpt the trained vectors and the average
(`model_ema.embedding_vectors`)."""
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldm.checkpoint import EMA_PREFIX, CheckpointError, read_embedding, save_embedding
from ldm.modules.ema import Averaged, named_parameters
from ldm.util import UserError, file_sha256

logger = logging.getLogger(__name__)

VECTORS = "embedding_vectors"  # the trained vectors' state-dict key (never in an SD v1 step file)
AVERAGE = EMA_PREFIX + VECTORS  # their average's (LitEma's name for them)
CHECKPOINT_KEY = "embedding"  # last.ckpt: the options and the step the vectors stopped training at
EMBEDDING_SUFFIX = ".embedding.safetensors"  # a pivotal run's embedding file beside each step file
DEFAULT_LR = 5e-3  # the original textual-inversion configs' base_learning_rate


@dataclass
class EmbeddingOptions:
    """`model.params.embedding`: the word the captions carry (`--token`), the word whose token embeddings start the
    vectors (`--init_word`), how many vectors, their learning rate and stop step (a step, or a fraction of max_steps
    below 1), and whether the UNet trains too (`pivotal`; a LoRA run always does)."""

    token: str = "sks"
    init_word: str = "dog"
    num_vectors: int = 1
    lr: Optional[float] = None
    stop_step: Optional[float] = None
    pivotal: bool = False
    base_checkpoint: Optional[str] = None  # the base model a textual-inversion run loads again on resume
    base_ema: bool = False

    @classmethod
    def from_config(cls, config: Optional[Mapping]) -> Optional["EmbeddingOptions"]:
        """The options of a `model.params.embedding` mapping, checked; None when it is not set."""
        if not config:
            return None
        try:
            options = cls(**dict(config))
        except TypeError as err:
            raise UserError(f"model.params.embedding: {err}") from None
        if isinstance(options.num_vectors, bool) or not isinstance(options.num_vectors, int) or not \
                1 <= options.num_vectors <= 75:
            raise UserError(f"--num_vectors {options.num_vectors}: expected 1 to 75 vectors (a prompt holds 75 tokens)")
        if options.lr is not None and options.lr <= 0:
            raise UserError(f"--embedding_lr {options.lr}: expected a learning rate above 0")
        if options.stop_step is not None and options.stop_step <= 0:
            raise UserError(f"--embedding_stop_step {options.stop_step}: expected a step, or a fraction of max_steps "
                            "below 1, above 0")
        return options

    @property
    def learning_rate(self) -> float:
        """The vectors' base learning rate (before --scale_lr)."""
        return DEFAULT_LR if self.lr is None else self.lr


class EmbeddingTraining:
    """Mixed into LatentDiffusion; `self.embedding` (EmbeddingOptions or None) comes from `model.params.embedding`."""

    embedding: Optional[EmbeddingOptions]
    embedding_stopped_at: Optional[int] = None
    embedding_lr: Optional[float] = None  # set by main.py (scaled as base_learning_rate is)
    sampling_words: dict[str, torch.Tensor]
    cond_stage_trainable: bool
    lora: Any
    use_ema: bool
    embedding_ema: bool = False  # use_ema in an embedding run: the vectors join the average once made

    def init_embedding(self, options: Optional[Mapping], cond_stage_trainable: bool) -> None:
        """Read `model.params.embedding` and refuse what cannot go with it (call before the parts are built)."""
        self.embedding = EmbeddingOptions.from_config(options)
        self.sampling_words = {}
        if self.embedding is None:
            return
        if self.lora is not None:
            self.embedding.pivotal = True  # the LoRA trains beside the vectors
        if cond_stage_trainable and self.lora is None:
            raise UserError("model.params.embedding trains new token vectors of a frozen text encoder, but "
                            "cond_stage_trainable is true: set it false (--freeze_text_encoder), or train the text "
                            "encoder's LoRA (--rank N --lora_text_encoder)")
        if not self.embedding.pivotal and self.embedding.stop_step is not None:
            raise UserError(f"--embedding_stop_step {self.embedding.stop_step}: the embedding is all that trains; stop "
                            "the run with --max_steps instead (a stop step is for pivotal tuning)")

    @property
    def unet_trains(self) -> bool:
        """Whether the UNet (or its LoRA) trains: always, but in a textual-inversion run."""
        return self.embedding is None or self.embedding.pivotal

    @property
    def embedding_trains(self) -> bool:
        """Whether the vectors train now (they exist and have not stopped)."""
        vectors = getattr(self, VECTORS, None)
        return vectors is not None and vectors.requires_grad

    @property
    def text_conditioning_trains(self) -> bool:
        """Whether a caption's conditioning changes from step to step: the text encoder or the embedding trains, or
        the vectors' average (which samples use) moves."""
        return self.cond_stage_trainable or self.embedding_trains or self.embedding_ema

    def add_embedding(self, step_file: Optional[Path] = None) -> None:
        """Make the trained vectors (after the base weights load): the init word's token embeddings, or those of the
        embedding file of a weights-only step file; in a textual-inversion run, freeze the UNet."""
        encoder, options = self.cond_stage_model, self.embedding
        encoder.check_word(options.token, "--token (model.params.embedding.token)")
        if step_file is not None:
            vectors = self.read_vectors(self.embedding_file(step_file))
        else:
            vectors = spread(encoder.embed_word(options.init_word, "--init_word"), options.num_vectors,
                             options.init_word)
        self.register_parameter(VECTORS, nn.Parameter(vectors.float()))
        if not self.unet_trains:
            self.model.requires_grad_(False)
            self.strict_loading = False  # last.ckpt holds the vectors only; on_load_checkpoint checks them
        if self.embedding_ema:  # the average starts from the vectors (a step file's: its average)
            if self.use_ema:  # pivotal tuning: beside the UNet's or the LoRA's
                self.extend_ema(VECTORS, getattr(self, VECTORS))
            else:
                self.init_ema({VECTORS: getattr(self, VECTORS)})
        logger.info("textual inversion: %d vector%s of width %d for %r (from %s), %s", options.num_vectors,
                    "s" if options.num_vectors > 1 else "", vectors.shape[1], options.token,
                    step_file or f"the init word {options.init_word!r}",
                    "beside the UNet (pivotal tuning)" if self.unet_trains else "the UNet and text encoder frozen")

    def read_vectors(self, path: Path) -> torch.Tensor:
        """An embedding file's vectors, checked to fit this run (width, count)."""
        found = read_embedding(path).vectors
        expected = (self.embedding.num_vectors, self.cond_stage_model.width)
        if tuple(found.shape) != expected:
            raise CheckpointError(f"{path} holds {found.shape[0]} vectors of width {found.shape[1]}; this run "
                                  f"trains {expected[0]} of width {expected[1]}")
        return found

    def embedding_file(self, step_file: Path) -> Path:
        """The embedding file of a step file: the step file itself in a textual-inversion run, else the one beside."""
        step_file = Path(step_file)
        return step_file.with_suffix(".safetensors") if not self.unet_trains else \
            step_file.with_name(step_file.name.split(".")[0] + EMBEDDING_SUFFIX)

    def bound_words(self) -> dict[str, torch.Tensor]:
        """The words the text encoder replaces by vectors: the embedding files given for sampling, and the trained
        token."""
        vectors = getattr(self, VECTORS, None)
        if vectors is None:
            return self.sampling_words
        return {**self.sampling_words, self.embedding.token: vectors}

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The text encoder's output for `captions`, with the bound words' vectors in place of those words."""
        words = self.bound_words()
        return self.cond_stage_model.encode(captions, words) if words else self.cond_stage_model.encode(captions)

    def embedding_groups(self) -> list[dict]:
        """The optimizer's group of the vectors, at their own learning rate."""
        vectors = getattr(self, VECTORS, None)
        if vectors is None:
            return []
        lr = self.embedding_lr if self.embedding_lr is not None else self.embedding.learning_rate
        return [{"params": [vectors], "lr": lr, "name": "embedding"}]

    def frozen_base(self, device_type: str) -> list[nn.Module]:
        """A textual-inversion run's frozen UNet joins the parts stored at the frozen dtype (on an accelerator)."""
        frozen = super().frozen_base(device_type)
        if self.embedding is not None and not self.unet_trains and not (device_type == "cpu" and
                                                                       self.frozen_precision == "auto"):
            frozen.append(self.model)
        return frozen

    def ema_source(self) -> Averaged:
        """The vectors, by their state-dict name, beside what else the EMA averages."""
        source = super().ema_source()
        vectors = getattr(self, VECTORS, None)
        return source if vectors is None else {**dict(named_parameters(source)), VECTORS: vectors}

    def saved_vectors(self) -> torch.Tensor:
        """The vectors an embedding file holds: their average with use_ema, else the trained ones."""
        if self.embedding_ema:
            return self.model_ema.get_buffer(self.model_ema.shadow_names[VECTORS])
        return getattr(self, VECTORS)

    def step_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights for an SD v1 step file: without the vectors and their average (they go to their own
        file)."""
        return {k: v for k, v in super().step_state_dict().items() if k not in (VECTORS, AVERAGE)}

    @property
    def weights_suffix(self) -> str:
        """A textual-inversion run's step files are embedding files."""
        return ".safetensors" if self.embedding is not None and not self.unet_trains else super().weights_suffix

    def save_step_weights(self, path: Path, dtype: Optional[torch.dtype] = None,
                          shared_dtype: Optional[torch.dtype] = None, beside_resumable: bool = False) -> None:
        """A textual-inversion run writes its embedding file (`path` as .safetensors); a pivotal run writes its
        weights (or LoRA file) as before and the embedding file beside them (`step_N.embedding.safetensors`); with
        use_ema the embedding file holds the average."""
        if self.embedding is None:
            super().save_step_weights(path, dtype, shared_dtype, beside_resumable)
            return
        if self.unet_trains:
            super().save_step_weights(path, dtype, shared_dtype, beside_resumable)
        base = self.embedding.base_checkpoint or (self.lora.base_checkpoint if self.lora is not None else None)
        known = base is not None and Path(base).is_file()
        save_embedding(self.saved_vectors(), self.embedding_file(path), self.embedding.token, self.global_step,
                       Path(base).name if base else "", file_sha256(base) if known else "", dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """last.ckpt keeps the vectors beside what else trains (only them and their average in a textual-inversion
        run), the options, and the step the vectors stopped training at."""
        vectors = {k: v for k, v in checkpoint["state_dict"].items() if k == VECTORS}
        super().on_save_checkpoint(checkpoint)
        if self.embedding is None:
            return
        if not self.unet_trains:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(EMA_PREFIX)}
        checkpoint["state_dict"].update(vectors)
        checkpoint[CHECKPOINT_KEY] = {**asdict(self.embedding), "stopped_at": self.embedding_stopped_at}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a last.ckpt of the other kind, or whose vectors or average do not fit; a run resumes with its vectors
        frozen from the step they stopped at."""
        state = checkpoint["state_dict"]
        vectors = {k: state.pop(k) for k in list(state) if k == VECTORS}
        if (self.embedding is None) != (CHECKPOINT_KEY not in checkpoint):
            raise CheckpointError("this checkpoint's run " + ("trained an embedding, but the config does not: resume "
                                  "it with its own run folder's configs" if self.embedding is None else "trained no "
                                  "embedding, but the config does: resume it without --train_embedding"))
        if self.embedding is not None:
            self.check_average(state, vectors)
        super().on_load_checkpoint(checkpoint)
        if self.embedding is None:
            return
        own = getattr(self, VECTORS)
        if VECTORS not in vectors or vectors[VECTORS].shape != own.shape:
            found = tuple(vectors[VECTORS].shape) if VECTORS in vectors else "none"
            raise CheckpointError(f"the checkpoint's embedding vectors ({found}) do not fit this run's "
                                  f"{tuple(own.shape)}; were other --num_vectors used?")
        state.update(vectors)
        self.embedding_stopped_at = checkpoint[CHECKPOINT_KEY].get("stopped_at")

    def check_average(self, state: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]) -> None:
        """Refuse a last.ckpt with an EMA when this run keeps none, or without one when it does; the vectors of a
        pivotal run from before they were averaged start their average."""
        found = any(key.startswith(EMA_PREFIX) for key in state)
        if found != self.use_ema:
            raise CheckpointError(f"the checkpoint {'has' if found else 'has no'} EMA weights (model_ema.*), but the "
                                  f"config {'does not set' if found else 'sets'} model.params.use_ema: was it changed?")
        if found and AVERAGE not in state and VECTORS in vectors:
            state[AVERAGE] = vectors[VECTORS].clone()

    def embedding_stop_step(self) -> Optional[int]:
        """The step from which the vectors are frozen: the configured one (main.py made a fraction a step) or the
        one a resumed run froze them at, whichever is earlier."""
        stops = [int(s) for s in (self.embedding.stop_step, self.embedding_stopped_at) if s is not None]
        return min(stops) if stops else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        stop = self.embedding_stop_step() if self.embedding is not None else None
        if stop is not None and self.embedding_trains and self.global_step >= stop:
            self.stop_embedding_training(stop)

    def stop_embedding_training(self, stop: int) -> None:
        """Freeze the vectors and drop their optimizer state (their group stays, so that a resume's state still
        matches the groups); under DDP the model is wrapped anew."""
        vectors = getattr(self, VECTORS)
        vectors.requires_grad_(False)
        vectors.grad = None
        for optimizer in self.trainer.optimizers:
            optimizer.state.pop(vectors, None)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.model.module
            strategy.configure_ddp()  # a wrapper waits for the gradients of all that trained when it was built
        self.embedding_stopped_at = stop
        self.text_embeddings.clear()
        logger.info("step %d: the embedding vectors are frozen from step %d on (--embedding_stop_step); the %s "
                    "trains on", self.global_step, stop, "LoRA" if self.lora is not None else "UNet")


def spread(rows: torch.Tensor, count: int, word: str) -> torch.Tensor:
    """`count` vectors from a word's token embeddings [k, width]: vector i starts as token i * k // count (a
    one-token word starts them all); a word of more tokens than vectors is an error."""
    if len(rows) > count:
        raise UserError(f"--init_word {word!r} is {len(rows)} tokens, more than the {count} vectors (--num_vectors): "
                        f"pass --num_vectors {len(rows)}, or a word of fewer tokens")
    return rows[[i * len(rows) // count for i in range(count)]].clone()
