"""The resumable training state in save_path/state/: what is saved, how it is read back without unpickling, and what
a resumed run must share with the saved one.

Files (tensors through torch.save, read back with weights_only=True; everything else JSON):

- ``run.json``: loop position (:class:`TrainState`), LR scheduler, gradient scaler, number of processes, the run's
  config and the LMDB's fingerprint;
- ``model.pt`` (the trainable network's state dict) and ``optimizer.pt`` (AdamW's state dict), written by the main
  process (both are the same in every process);
- ``rng_<rank>.pt`` (torch CPU and CUDA generator states) and ``rng_<rank>.json`` (Python's and numpy's) of every
  process;
- ``COMPLETE``, written last.

A save goes to ``state.tmp/`` and is swapped in with renames, so a crash mid-save keeps the previous state
(``state.old/`` is used if the crash fell between the two renames).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from config import Config
from models.files import CheckpointError, load_file

STATE_DIR = "state"
FORMAT = 1

# A resumed run must have the same of these as the saved one, or it would not continue the same run.
MUST_MATCH = (
    # the network (parameter shapes and forward)
    "embed_dim", "n_layer", "n_head", "activation_function", "n_positions", "dropout", "resampler_depth",
    "resampler_dim_head", "resampler_heads", "resampler_num_media_embeds", "resampler_num_latents", "seq_len",
    "chunk_size", "skip_frame", "act_dim", "state_dim", "img_feat_dim", "patch_feat_dim", "lang_feat_dim", "rgb_shape",
    "patch_size", "clip_text_width", "clip_text_layers", "clip_text_heads", "mae_depth", "mae_num_heads",
    # the data order and the optimiser steps
    "bs_per_gpu", "gradient_accumulation_steps", "seed", "action_mode", "split", "train_ratio", "frame_sharing",
)
# Changing these continues the run with other results than an uninterrupted one would give: said in one line.
CHANGES_RESULTS = (
    "lr_max", "weight_decay", "arm_loss_ratio", "num_warmup_epochs", "num_epochs", "lr_schedule", "rgb_static_pad",
    "rgb_gripper_pad", "rgb_mean", "rgb_std", "without_norm_pixel_loss", "mae_ckpt", "clip_ckpt", "clip_precision",
    "mixed_precision", "exact_attention", "compile_model", "print_steps",
)


@dataclass
class TrainState:
    """Where the run is."""

    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of this epoch already trained
    update: int = 0  # optimiser steps taken in total
    batches: int = 0  # batches trained in total
    val_epoch: int = 0  # pass over the validation split that the next validation batch comes from
    val_batch: int = 0  # validation batches of that pass already used


def state_dirs(save_path: str) -> tuple[str, str, str]:
    base = os.path.join(save_path, STATE_DIR)
    return base, base + ".tmp", base + ".old"


def find_training_state(save_path: str) -> str | None:
    """The last complete saved state (also after a crash between the folder swaps), or None."""
    for path in state_dirs(save_path)[::2]:  # final, then .old
        if os.path.isfile(os.path.join(path, "COMPLETE")):
            return path
    return None


def lmdb_fingerprint(episode_of_step: np.ndarray, info: dict | None) -> str:
    """Identifies an LMDB's content (its steps' segments and, for this project's conversions, its input), not its
    path: a moved LMDB still resumes, another one is refused."""
    digest = hashlib.sha256(np.ascontiguousarray(episode_of_step, dtype="<i4").tobytes())
    digest.update(json.dumps((info or {}).get("plan_digest")).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- random number generators

def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, JSON-able values) of every generator this process's training draws from."""
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, Any], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda" in tensors:
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, words, gauss = values["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- saving

def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def save_training_state(accelerator, save_path: str, run: dict[str, Any], model_sd: dict[str, torch.Tensor],
                        optimizer_sd: dict) -> None:
    """Every process writes its RNG state, the main process the rest, into state.tmp/, then it is swapped in.
    Non-finite weights are never saved (the previous state is kept)."""
    bad = [k for k, v in model_sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"not saving the training state: {len(bad)} weights hold NaN or inf (first: {bad[0]})")
    final, tmp, old = state_dirs(save_path)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    tensors, values = rng_state()
    torch.save(tensors, os.path.join(tmp, f"rng_{rank}.pt"))
    _write_json(os.path.join(tmp, f"rng_{rank}.json"), values)
    if accelerator.is_main_process:
        torch.save(model_sd, os.path.join(tmp, "model.pt"))
        torch.save(optimizer_sd, os.path.join(tmp, "optimizer.pt"))
        _write_json(os.path.join(tmp, "run.json"), {"format": FORMAT, **run})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(os.path.join(tmp, "COMPLETE"), "ok")
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def run_record(state: TrainState, scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Any, cfg: Config,
               num_processes: int, fingerprint: str) -> dict[str, Any]:
    """The JSON part of the training state."""
    return {"train": asdict(state), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "num_processes": num_processes, "lmdb": fingerprint, "config": cfg.to_dict()}


# ---------------------------------------------------------------- loading

@dataclass
class SavedState:
    path: str
    run: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict
    rng_tensors: dict[str, Any]
    rng_values: dict[str, Any]

    @property
    def train(self) -> TrainState:
        return TrainState(**self.run["train"])


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON
        raise CheckpointError(f"training state file {path} cannot be read ({type(e).__name__}: {e}); delete "
                              f"{os.path.dirname(path)} to start afresh") from None


def check_resumable(run: dict[str, Any], cfg: Config, num_processes: int, fingerprint: str, path: str) -> list[str]:
    """Refuses (CheckpointError) to resume a state saved by a run that this one cannot continue exactly; returns
    the config keys changed in a way that changes results (to be reported)."""
    saved = run.get("config", {})
    if run.get("format") != FORMAT or not isinstance(saved, dict) or not isinstance(run.get("train"), dict) or \
            {f.name for f in fields(TrainState)} != set(run["train"]):
        raise CheckpointError(f"{path} is not a training state of this version; delete it to start afresh")
    ours = cfg.to_dict()
    differ = [k for k in MUST_MATCH if k in saved and saved[k] != ours[k]]
    if differ:
        listing = ", ".join(f"{k}={saved[k]!r} (now {ours[k]!r})" for k in differ[:6])
        raise CheckpointError(f"resume=true: the state in {path} was saved with {listing}; use the same values, or "
                              "another save_path to start a new run")
    if run.get("num_processes") != num_processes:
        raise CheckpointError(f"resume=true: the state in {path} was saved by {run.get('num_processes')} processes, "
                              f"this run has {num_processes}; resume with as many")
    if run.get("lmdb") != fingerprint:
        raise CheckpointError(f"resume=true: the state in {path} was saved while training on another LMDB (it was "
                              f"{saved.get('LMDB_path')!r}); resume with it, or use another save_path")
    return [k for k in CHANGES_RESULTS if k in saved and saved[k] != ours[k]]


def read_training_state(path: str, cfg: Config, num_processes: int, rank: int, fingerprint: str
                        ) -> tuple[SavedState, list[str]]:
    """Reads and checks the state at `path` (see check_resumable); no file is unpickled beyond tensors."""
    run = _read_json(os.path.join(path, "run.json"))
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}/run.json is not a training state; delete {path} to start afresh")
    changed = check_resumable(run, cfg, num_processes, fingerprint, path)
    rng_values = _read_json(os.path.join(path, f"rng_{rank}.json"))
    saved = SavedState(path, run, load_file(os.path.join(path, "model.pt")),
                       load_file(os.path.join(path, "optimizer.pt")), load_file(os.path.join(path, f"rng_{rank}.pt")),
                       rng_values)
    if not isinstance(saved.rng_tensors, dict) or not isinstance(rng_values, dict) or \
            not {"torch"} <= set(saved.rng_tensors) or not {"python", "numpy"} <= set(rng_values):
        raise CheckpointError(f"{path}: the random generator state of process {rank} is incomplete")
    return saved, changed


def resume_point(cfg: Config, num_processes: int, rank: int, fingerprint: str
                 ) -> tuple[SavedState | None, list[str]]:
    """(the saved state to resume, one-line notes to print). None without resume=true, and with a warning if there
    is no saved state yet (the run starts afresh); a state of another run is refused (check_resumable)."""
    if not cfg.resume:
        return None, []
    path = find_training_state(cfg.save_path)
    if path is None:
        return None, [f"warning: resume=true but {os.path.join(cfg.save_path, STATE_DIR)} holds no saved training "
                      "state: starting a new run"]
    saved, changed = read_training_state(path, cfg, num_processes, rank, fingerprint)
    notes = []
    if changed:
        notes.append(f"warning: resuming with other {', '.join(changed)} than the saved run: the results will differ "
                     "from an uninterrupted run")
    if cfg.ckpt_path or cfg.load_bytedance_ckpt or cfg.load_grmg_ckpt or cfg.load_epoch:
        notes.append("note: resuming the saved training state; ckpt_path / load_bytedance_ckpt / load_grmg_ckpt / "
                     "load_epoch are not loaded")
    return saved, notes


def load_saved_weights(model: torch.nn.Module, saved: SavedState) -> None:
    try:
        model.load_state_dict(saved.model, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{saved.path}/model.pt does not fit the model ({str(e).splitlines()[0][:300]})"
                              ) from None


def restore_state(saved: SavedState, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> TrainState:
    """Optimiser, scheduler, gradient scaler and this process's generators as they were saved; the loop position."""
    try:
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.run["scheduler"])
        if scaler is not None and saved.run.get("scaler"):
            scaler.load_state_dict(saved.run["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{saved.path}: the optimiser or scheduler state does not fit ({e})") from None
    set_rng_state(saved.rng_tensors, saved.rng_values)
    return saved.train
