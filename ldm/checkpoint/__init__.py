"""The only place that reads or writes weight files, a chain with no way back up: safe .ckpt unpickling and
.safetensors (files.py), loading into a model by part with strict shapes (loading.py), atomic writes in the layouts
other SD tools accept (writing.py), LoRA and ControlNet files (adapters.py), textual-inversion embeddings
(embeddings.py), diffusers pipeline folders (diffusers.py), "a file or a folder" (sources.py), and which repository
config fits a file (fitting.py)."""
from ldm.checkpoint.adapters import load_controlnet_weights, read_controlnet, read_lora, save_lora
from ldm.checkpoint.embeddings import EmbeddingFile, adapter_kind, read_embedding, save_embedding
from ldm.checkpoint.files import (ADAPTER_KEY, EMA_PREFIX, GROUPS, REQUIRED_GROUPS, UNET_PREFIX, CheckpointError,
                                  ShapeMismatchError, check_checkpoint_file, check_finite, ema_key, group_of,
                                  read_checkpoint, select_unet_weights, to_sd_layout)
from ldm.checkpoint.loading import LoadReport, check_compatible, on_meta, parameters_on_meta
from ldm.checkpoint.sources import export_weights, load_model_weights, read_state_dict, read_weights
from ldm.checkpoint.writing import (PRECISIONS, WEIGHT_SUFFIXES, ExportReport, precision_dtype,
                                    remove_stale_temp_files, save_checkpoint, save_weights)

__all__ = ["ADAPTER_KEY", "EMA_PREFIX", "GROUPS", "PRECISIONS", "REQUIRED_GROUPS", "UNET_PREFIX", "WEIGHT_SUFFIXES",
           "CheckpointError", "EmbeddingFile", "ExportReport", "LoadReport", "ShapeMismatchError", "adapter_kind",
           "check_checkpoint_file", "check_compatible", "check_finite", "ema_key", "export_weights", "group_of",
           "load_controlnet_weights", "load_model_weights", "on_meta", "parameters_on_meta", "precision_dtype",
           "read_checkpoint", "read_controlnet", "read_embedding", "read_lora", "read_state_dict", "read_weights",
           "remove_stale_temp_files", "save_checkpoint", "save_embedding", "save_lora", "save_weights",
           "select_unet_weights", "to_sd_layout"]
