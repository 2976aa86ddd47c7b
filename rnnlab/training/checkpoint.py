"""Checkpoints: weights + model config + vocabulary, loadable without the training code.

A model checkpoint (best.pt) is a plain dict of tensors, numbers and strings, read back with
`torch.load(weights_only=True)`; `load_checkpoint` rebuilds the model from it alone. A resumable
checkpoint (resume.pt) also holds the optimizer and RNG states and a fingerprint of the settings,
data and code, so a run is only ever resumed by what started it (rnnlab/training/resume.py).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rnnlab.data.vocab import Vocab
from rnnlab.errors import UserError
from rnnlab.fileio import atomic_path
from rnnlab.models.lm import RNNLM, ModelConfig, build_model

FORMAT = "rnnlab-checkpoint/1"


def save_checkpoint(path: str | Path, model: RNNLM, vocab: Vocab, **meta: Any) -> None:
    payload = {
        "format": FORMAT,
        "model_config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab.to_dict(),
        **meta,
    }
    _save(path, payload)


def load_checkpoint(path: str | Path, vocab: Vocab | None = None,
                    device: torch.device | str = "cpu") -> tuple[RNNLM, Vocab, dict]:
    """Rebuild the model saved at `path`; with `vocab`, also check it was trained on that one."""
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not an rnnlab model checkpoint (expected format {FORMAT})")
    try:
        model = build_model(ModelConfig(**payload["model_config"]))
        saved_vocab = Vocab.from_dict(payload["vocab"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: the checkpoint's model config, vocabulary or weights are unreadable "
                        f"({type(err).__name__}: {err})") from None
    if vocab is not None and saved_vocab.tokens != vocab.tokens:
        raise UserError(
            f"{path}: the checkpoint was trained on another vocabulary ({len(saved_vocab)} tokens) "
            f"than the data given ({len(vocab)} tokens); retrain it on this data"
        )
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError) as err:  # missing or unexpected keys, other shapes; not a dict
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(
            f"{path}: the weights do not fit the model config stored with them (from another "
            f"variant or a damaged file?): {first}"
        ) from None
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "model_config", "vocab")}
    return model.to(device), saved_vocab, meta


def save_resume(path: str | Path, snapshot: dict, fingerprint: Any, **meta: Any) -> None:
    _save(path, {"format": FORMAT + "+resume", "fingerprint": fingerprint, **meta, **snapshot})


def load_resume(path: str | Path) -> dict | None:
    """The resumable state saved at `path`, None if there is none; a UserError if it is
    unreadable. Whether it may be used is rnnlab/training/resume.py's decision (its fingerprint)."""
    if not Path(path).is_file():
        return None
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT + "+resume":
        raise UserError(f"{path}: not a resumable training state")
    return payload


def _save(path: str | Path, payload: dict) -> None:
    # serialise in memory, then write plain bytes: torch.save onto a full disk raises a bare
    # RuntimeError ("unexpected pos"), a plain write the OSError (ENOSPC) that atomic_path explains
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; run the train stage first")
    damaged = f"{path}: not a readable checkpoint (truncated or corrupt?)"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a truncated one has lost its index
        raise UserError(f"{damaged}: not the zip archive torch.save writes")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling damaged bytes can fail in any way at all
        # (UnpicklingError, RuntimeError, EOFError, IndexError, ...); their messages run to pages
        first = (str(err).strip().splitlines() or [""])[0]
        detail = ("its contents are damaged or not plain tensors, numbers and strings"  # torch's own
                  if isinstance(err, pickle.UnpicklingError)  # message suggests weights_only=False
                  else f"{type(err).__name__}: {first[:200]}")
        raise UserError(f"{damaged}: {detail}") from None
