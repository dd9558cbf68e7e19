"""Self-describing checkpoints: a trainable can be rebuilt from the file alone.

Layout (torch.save of a dict):
    format      "smoothing-orchestrator/1"
    trainable   registry name, e.g. "glean"
    hparams     the resolved hyperparameters
    info        trainables.data.DataInfo as a dict (dataset, shapes, normalisation, domains, data source)
    epochs      the run's total epochs;  epoch  the number of finished epochs
    state       Trainable.state_dict()
    extra       free-form (e.g. metrics so far)
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainables.data import DataInfo
from trainables.device import HOST

FORMAT = "smoothing-orchestrator/1"
#: the project's own types a checkpoint may hold besides tensors, containers, numbers and strings
#: (torch.load(weights_only=True) refuses everything else). Empty today: `save` writes plain data only
#: (DataInfo as a dict); add a type here, never switch weights_only off.
SAFE_GLOBALS: list[Any] = []


class CheckpointError(ValueError):
    """The file is not a usable checkpoint (missing, corrupt, another format or architecture)."""


def save(path: str | os.PathLike, trainable, epoch: int, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temporary file + rename), so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "trainable": trainable.NAME, "hparams": dict(trainable.hparams),
            "info": dataclasses.asdict(trainable.info), "epochs": trainable.epochs, "epoch": int(epoch),
            "state": trainable.state_dict(), "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict, validated; CheckpointError says what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # weights_only: checkpoints come from tracking servers and other people's runs; a full unpickler
        # would run whatever code a crafted file names. Only tensors, containers, numbers, strings and the
        # types allow-listed in SAFE_GLOBALS are rebuilt.
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            blob = torch.load(path, map_location=HOST, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(f"{path} names code outside the checkpoint format's allow-list "
                                  f"({found.group(1) or found.group(2)}); it was not loaded: it may be malicious "
                                  "or written by another tool") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (UnpicklingError); it may be truncated or "
                              "corrupt: retrain or use another checkpoint") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
                              "it may be truncated or corrupt: retrain or use another checkpoint") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (written by another tool or version)")
    return blob


def load(path: str | os.PathLike, device: "str | torch.device" = HOST):
    """Rebuild the trainable stored at `path`, weights loaded, on `device` (read onto the host, then moved:
    trainables.device). Returns (trainable, checkpoint dict)."""
    from trainables.registry import get_trainable

    blob = read(path)
    info = blob["info"]
    info = DataInfo(**{**info, **{k: tuple(v) for k, v in info.items() if isinstance(v, list)}})
    cls = get_trainable(blob["trainable"])
    trainable = cls(blob["hparams"], info, epochs=blob.get("epochs", 1), device=device)
    try:
        trainable.load_state_dict(blob["state"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit a {blob['trainable']} network with these "
                              f"hyperparameters ({exc})") from None
    return trainable, blob
