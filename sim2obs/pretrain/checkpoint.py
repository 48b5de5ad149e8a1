"""Run checkpoints of ``sim2obs pretrain``: atomic writes, safe loads (``weights_only=True``,
no pickle execution, clear errors for damaged or foreign files), and the record of the training
data that lets ``--resume`` refuse other data than the run's.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import torch

from sim2obs._atomic import atomic_output
from sim2obs.errors import Sim2ObsDataError, Sim2ObsFileNotFoundError, Sim2ObsValueError

__all__ = ["CHECKPOINT", "check_resumed_data", "checkpoint_hash", "load_checkpoint", "save_checkpoint",
           "training_data_summary"]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic ``torch.save``: serialised in memory, written to a temporary file in the same
    folder, then renamed. (Saved straight to the temporary file, torch names the zip archive's
    inner folder after it, a random name: identical runs gave checkpoints of different bytes and
    different :func:`checkpoint_hash` values.)"""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def checkpoint_path(run_dir: str | Path) -> Path:
    """``RUN/checkpoint.pt`` of a run folder -- or the checkpoint file itself, when given."""
    run = Path(run_dir)
    return run if run.is_file() and run.name == CHECKPOINT else run / CHECKPOINT


def load_checkpoint(run_dir: str | Path) -> dict:
    """Load ``RUN/checkpoint.pt`` safely (``weights_only=True``)."""
    path = checkpoint_path(run_dir)
    run = path.parent
    if not path.is_file():
        if run.is_dir() and any(run.glob("*.h5")):
            raise Sim2ObsFileNotFoundError(
                f"'{run}' holds shards, not a run (no {CHECKPOINT}): pass the folder that "
                "`sim2obs pretrain ... --out RUN` wrote (are the run and the shard folders swapped?)"
            )
        raise Sim2ObsFileNotFoundError(
            f"no checkpoint at '{path}': pass the folder a `sim2obs pretrain ... --out RUN` (or "
            "`sim2obs adapt`) run wrote"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        text = str(exc)
        # torch's own advice (weights_only=False) does not apply to a sim2obs checkpoint
        if re.search(r"GLOBAL \S+ was not an allowed global|whose module \S+ is blocked|\S+ must be "
                     r"\S+ to load", text):
            raise Sim2ObsDataError(
                f"'{path}' is not a sim2obs checkpoint: it holds Python objects a checkpoint does "
                "not, and loading them could run code, so it is refused. Pass the folder of a "
                "`sim2obs pretrain` or `sim2obs adapt` run"
            ) from exc
        if "WeightsUnpickler error:" in text:  # garbage parsed as a pickle: keep torch's finding only
            text = text.split("WeightsUnpickler error:", 1)[1].strip()
        reason = text.splitlines()[0][:200] if text.strip() else ""
        raise Sim2ObsDataError(
            f"'{path}' is not a readable sim2obs checkpoint: truncated, corrupt or not a PyTorch "
            f"file (torch.load: {type(exc).__name__}: {reason}). Checkpoints are written "
            "atomically, so a damaged one was damaged after it was written (a copy cut short, a "
            "full disk, another program): restore it from a copy or train the run again"
        ) from exc
    missing = ([] if not isinstance(ckpt, dict) else
               [k for k in ("model", "config", "normalizer", "encoder_config", "epoch") if k not in ckpt])
    if not isinstance(ckpt, dict) or missing:
        raise Sim2ObsDataError(
            f"'{path}' is a PyTorch file but not a sim2obs run checkpoint (no {missing or 'dict'}): "
            "pass the folder of a `sim2obs pretrain` or `sim2obs adapt` run"
        )
    return ckpt


def checkpoint_hash(run_dir: str | Path) -> str:
    return hashlib.sha256(checkpoint_path(run_dir).read_bytes()).hexdigest()[:16]


def training_data_summary(dataset) -> dict:
    """What a run was trained on, for its checkpoint: ``bands``, training ``galaxies`` (stamps)
    per survey, the ``stamp`` size (pixels) and a ``fingerprint`` (SHA-1 of the bands, each
    shard's survey, file name and training rows, and -- for an in-memory ``ShardDataset`` -- the
    object ids in order): a resumed run must see the same data in the same order to reproduce
    the uninterrupted one, wherever the folders now are."""
    files = [Path(f).name for f in dataset.files]
    if hasattr(dataset, "file_of"):  # ShardDataset: the rows of the training split
        counts = np.bincount(dataset.file_of, minlength=len(files)).tolist()
        ids = np.ascontiguousarray(dataset.object_id, dtype=np.int64).tobytes()
    else:  # StreamingShardDataset: its training rows per shard
        counts, ids = [int(c) for c in dataset.counts], b""
    per_survey: dict[str, int] = {}
    for survey, c in zip(dataset.surveys, counts, strict=True):
        per_survey[survey] = per_survey.get(survey, 0) + int(c)
    h = hashlib.sha1(json.dumps([list(dataset.bands), list(zip(dataset.surveys, files, counts, strict=True))]).encode())
    h.update(ids)
    return {"bands": list(dataset.bands), "galaxies": per_survey, "stamp": list(dataset.stamp),
            "fingerprint": h.hexdigest()}


def check_resumed_data(ckpt: dict, now: dict, out: Path, folders) -> None:
    """Refuse to resume a run on other data than it was trained on (other folders, bands, split):
    the result would not be the run's, and a different band count would fail deep in torch.
    ``now``: :func:`training_data_summary` of the data given for the resumed run."""
    saved = ckpt.get("data")
    if saved is None:  # older checkpoints record the bands only
        same = list(ckpt.get("bands", now["bands"])) == now["bands"]
        saved = {"bands": list(ckpt.get("bands", [])), "galaxies": "?"}
    else:
        same = saved["fingerprint"] == now["fingerprint"]
    if not same:
        raise Sim2ObsValueError(
            f"'{out}' was trained on bands {saved['bands']} with {saved['galaxies']} training "
            f"galaxies per survey, but {[str(f) for f in folders]} give bands {now['bands']} with "
            f"{now['galaxies']}: resume with the run's own folders, in the same order (listed in "
            f"{out / 'config.json'}), or start a new run with another --out"
        )
