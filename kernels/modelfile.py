"""Model files: a folder holding ``weights.pt`` (a ``state_dict``) and ``card.json``.

The card says what the weights are (architecture, normalisation, training parameters, data
fingerprint, validation loss, code version) and carries the SHA-256 of the weights file, so a
model is content-addressed: the engine keys resident models and run manifests by that hash, and
loading refuses weights that do not match their card. Weights are read with
``torch.load(..., weights_only=True)``: a model file can never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

WEIGHTS, CARD = "weights.pt", "card.json"


class ModelFileError(ValueError):
    """A model folder is missing, incomplete or does not match its card."""


class ModelCard(BaseModel):
    """What a model is and how it was made; written next to its weights."""

    model_config = ConfigDict(extra="allow")

    task: str  # "denoise", "segment", ...
    method: str  # "n2v2", "n2s", "unet3class", ...
    architecture: dict[str, Any]
    normalisation: dict[str, Any]  # how inputs were scaled in training
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)  # fingerprint of the training data
    validation_loss: float | None = None
    code_version: str = ""
    weights_sha256: str = ""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("tilewise")
    except Exception:  # pragma: no cover - running from a source tree
        return "unknown"


def save_model(folder: str | os.PathLike, state_dict: dict, card: ModelCard) -> ModelCard:
    """Write weights then the card with their hash; returns the card as written."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, folder / WEIGHTS)
    card = card.model_copy(update={"weights_sha256": sha256_file(folder / WEIGHTS),
                                   "code_version": card.code_version or code_version()})
    (folder / CARD).write_text(json.dumps(card.model_dump(), indent=2, sort_keys=True))
    return card


def read_card(folder: str | os.PathLike) -> ModelCard:
    folder = Path(folder)
    if not (folder / CARD).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelFileError(f"'{folder}' is not a tilewise model folder (needs {CARD} and {WEIGHTS}); "
                             "train one with `tilewise train`.")
    try:
        return ModelCard.model_validate_json((folder / CARD).read_text())
    except Exception as exc:
        raise ModelFileError(f"The model card '{folder / CARD}' is not valid: {exc}") from None


def load_model(folder: str | os.PathLike, device: str = "cpu") -> tuple[ModelCard, dict]:
    """The card and the weights, after checking the weights are the ones the card names."""
    import torch

    card = read_card(folder)
    actual = sha256_file(Path(folder) / WEIGHTS)
    if actual != card.weights_sha256:
        raise ModelFileError(f"The weights in '{folder}' do not match their card (sha256 {actual[:12]}… vs "
                             f"{card.weights_sha256[:12]}…): the file was changed or is incomplete. Re-train or "
                             "restore the model folder.")
    state = torch.load(Path(folder) / WEIGHTS, map_location=device, weights_only=True)
    return card, state
