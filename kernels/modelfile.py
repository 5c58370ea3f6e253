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
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kernels.contract import Kernel, KernelParams, KernelTraits
from kernels.errors import ModelFileError
from kernels.registry import KernelSpec

WEIGHTS, CARD = "weights.pt", "card.json"
DEFAULT_PERCENTILES = (1.0, 99.9)
# What the card's ``normalisation`` means at inference, written into every card.
INFERENCE_NORMALISATION = ("inputs are scaled by their own global percentiles at these levels (computed once per "
                           "input image); low/high here are the training image's, for reference")


class ModelCard(BaseModel):
    """What a model is and how it was made; written next to its weights."""

    model_config = ConfigDict(extra="allow")

    task: str  # "denoise", "segment", ...
    method: str  # "n2v2", "n2s", "unet3class", ...
    architecture: dict[str, Any]
    normalisation: dict[str, Any]  # percentiles, the training image's low/high, and ``at_inference``
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)  # fingerprint of the training data
    validation_loss: float | None = None
    # predictive uncertainty (``kernels.uncertainty.UncertaintyConfig``); None: a deterministic model
    uncertainty: dict[str, Any] | None = None
    # blind-spot denoisers: what blends the noisy pixel back in (``kernels.posterior``: noise line, leak)
    posterior: dict[str, Any] | None = None
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
    try:
        state = torch.load(Path(folder) / WEIGHTS, map_location=device, weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors (a pickled payload, say)
        raise ModelFileError(f"'{Path(folder) / WEIGHTS}' is not a plain state_dict of tensors and was not loaded "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}).") from None
    return card, state


def card_config(card: ModelCard):
    """The card's architecture as a ``kernels.unet.UNetConfig``."""
    from kernels.unet import UNetConfig

    return UNetConfig(**{**card.architecture, "pool": tuple(card.architecture["pool"])})


def card_uncertainty(card: ModelCard):
    """The card's uncertainty method (``kernels.uncertainty.UncertaintyConfig``), or None."""
    from kernels.uncertainty import UncertaintyConfig

    if not card.uncertainty:
        return None
    try:
        return UncertaintyConfig.model_validate(card.uncertainty)
    except Exception as exc:
        raise ModelFileError(f"The model card's uncertainty entry is not valid: {exc}") from None


def build_network(card: ModelCard):
    """The untrained network a card describes: a U-Net, an ADF U-Net (same weights, moment
    propagation on top) or a ``ModuleList`` of an ensemble's members (keys ``<k>.<name>``)."""
    from torch import nn

    from kernels.unet import UNet

    config, uncertainty = card_config(card), card_uncertainty(card)
    if uncertainty is not None and uncertainty.method == "ensemble":
        return nn.ModuleList(UNet(config) for _ in range(uncertainty.members))
    if uncertainty is not None and uncertainty.method == "adf":
        from kernels.adf import ADFUNet

        return ADFUNet(config, input_variance=uncertainty.input_variance, min_variance=uncertainty.min_variance)
    return UNet(config)


def verify_model(folder: str | os.PathLike) -> ModelCard:
    """Everything a worker will check, checked once on the client before any work starts: the
    card parses, the weights match its hash, load as plain tensors, and fit its architecture."""
    card, state = load_model(folder, "cpu")
    try:
        net = build_network(card)
        net.load_state_dict(state)
    except Exception as exc:
        raise ModelFileError(f"The weights in '{folder}' do not fit the architecture in its card "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); re-train or restore "
                             "the model folder.") from None
    return card


def card_percentiles(card: ModelCard) -> tuple[float, float]:
    """The percentile levels a model's inputs are normalised at (cards before these were
    recorded used the engine's default)."""
    lo, hi = card.normalisation.get("percentiles", DEFAULT_PERCENTILES)
    return float(lo), float(hi)


class UNetModelKernel(Kernel):
    """The shared half of the kernels that run a trained U-Net from a model folder: read the
    card (cheap, on the client: halo and alignment come from the architecture), load the
    checked weights once per worker, and run batches under ``torch.inference_mode()``.

    Subclasses name the card ``task`` they take and may widen the traits.
    """

    task: str = ""

    class Params(KernelParams):
        model: str
        sha256: str = ""
        samples: int | None = Field(None, ge=2, le=1000)  # mc-dropout: forward passes (default: the card's)
        # adf: input noise variance in normalised units (default: the card's, the training value)
        input_variance: float | None = Field(None, ge=0)
        # the network passes under torch.autocast in this dtype (opt-in: fp32 until its cost is measured)
        precision: Literal["fp32", "bf16", "fp16"] = "fp32"
        # the network's activations channels-last (NHWC / NDHWC), the layout the GPU's tensor cores
        # read; the same numbers in either layout. Off: for these U-Nets it was 0.7-0.8x as fast
        # on an H200 in every precision (``benchmarks/results/gpu.json``)
        channels_last: bool = False

    def __init__(self, params: Params):
        from kernels.unet import receptive_field

        super().__init__(params)
        self.card = read_card(params.model)
        if self.task and self.card.task != self.task:
            raise ModelFileError(f"'{params.model}' is a {self.card.task} model, not a {self.task} model.")
        if params.sha256 and params.sha256 != self.card.weights_sha256:
            raise ModelFileError(f"model '{params.model}' changed since this run started (weights hash differs)")
        self.config = card_config(self.card)
        self.uncertainty = card_uncertainty(self.card)
        if params.samples is not None and (self.uncertainty is None or self.uncertainty.method != "mc-dropout"):
            raise ModelFileError(f"samples applies to MC-dropout models only; '{params.model}' is "
                                 f"{self.uncertainty.method if self.uncertainty else 'deterministic'}.")
        if params.precision != "fp32" and self.uncertainty is not None and self.uncertainty.method == "adf":
            raise ModelFileError("ADF models run in fp32: their propagated variances span more range than bf16/fp16 "
                                 "keep precisely; drop --precision.")
        if params.input_variance is not None and (self.uncertainty is None or self.uncertainty.method != "adf"):
            raise ModelFileError(f"input_variance applies to ADF models only; '{params.model}' is "
                                 f"{self.uncertainty.method if self.uncertainty else 'deterministic'}.")
        self.traits = KernelTraits(ndim=self.config.ndim, in_channels=self.config.in_channels,
                                   out_channels=self.config.out_channels, halo=receptive_field(self.config).halo,
                                   align=self.config.factor, percentiles=card_percentiles(self.card),
                                   max_batch=16, device="gpu", working_bytes=self.working_bytes())
        self.net = None
        self.device = "cpu"
        self.tta = False  # test-time augmentation: subclasses that offer it set it from their parameters
        self.dropout_masks = None  # mc-dropout: kernels.uncertainty.FixedDropout, set by load()

    def working_bytes(self) -> int:
        """Bytes per padded voxel at inference: measured on CPU for the 3D ADF segmenter at
        width 16 (~1,500: ~94 per top-level channel, activations and their variances, skips and
        temporaries); a deterministic network keeps half (no variances)."""
        per_channel = 96 if self.uncertainty is not None and self.uncertainty.method == "adf" else 48
        return per_channel * int(self.config.width)

    def load(self, device: str) -> None:
        _, state = load_model(self.params.model, device)
        net = build_network(self.card)
        net.load_state_dict(state)
        if self.params.channels_last:
            import torch

            net = net.to(memory_format=torch.channels_last_3d if self.config.ndim == 3 else torch.channels_last)
        self.net, self.device = net.to(device).eval(), device
        if self.params.input_variance is not None:
            net.input_variance = float(self.params.input_variance)
        if self.uncertainty is not None and self.uncertainty.method == "mc-dropout":
            from kernels.uncertainty import FixedDropout

            self.dropout_masks = FixedDropout(self.net, rate=self.config.dropout, seed=self.uncertainty.seed)

    @property
    def samples(self) -> int:
        """Networks an uncertainty estimate averages: MC passes or ensemble members (else 1)."""
        u = self.uncertainty
        if u is None or u.method == "adf":
            return 1
        return u.members if u.method == "ensemble" else (self.params.samples or u.samples)

    def _running(self):
        """Inference mode, under ``torch.autocast`` in the chosen precision (CPU: bf16/fp16
        autocast exists too, so this path is tested without a GPU)."""
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.params.precision != "fp32":
            dtype = torch.bfloat16 if self.params.precision == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu",
                                               dtype=dtype))
        return stack

    def _tensor(self, batch: np.ndarray):
        import torch

        if self.net is None:
            raise RuntimeError(f"{self.card.task} kernel used before load()")
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The network's raw output for a ``(N, C, *spatial)`` batch of any spatial size (an
        ensemble's: the mean of its members'; MC dropout's: the network with dropout off)."""
        if self.uncertainty is not None and self.uncertainty.method == "ensemble":
            return self.predict_samples(batch).mean(axis=0)
        return self.predict_on_device(self._tensor(batch)).cpu().numpy()

    def predict_on_device(self, x):
        """The network's float32 output for an input tensor already on its device, left there
        (a step that follows on the device, such as the denoiser's posterior, reads it there)."""
        with self._running():
            return self.net.forward_padded(x, tta=self.tta).float()

    def predict_samples(self, batch: np.ndarray) -> np.ndarray:
        """``(S, N, C, *spatial)``: the raw outputs of an ensemble's members, or of MC dropout's
        ``samples`` networks (masks fixed per pass, the same in every tile)."""
        u = self.uncertainty
        x = self._tensor(batch)
        out = []
        with self._running():
            if u is not None and u.method == "ensemble":
                for member in self.net:
                    out.append(member.forward_padded(x, tta=self.tta).float().cpu().numpy())
            elif u is not None and u.method == "mc-dropout":
                for t in range(self.samples):
                    with self.dropout_masks.sample(t):
                        out.append(self.net.forward_padded(x, tta=self.tta).float().cpu().numpy())
            else:
                raise RuntimeError("predict_samples needs an ensemble or MC-dropout model")
        return np.stack(out)

    def predict_moments(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of the raw output of an ADF model, in one pass."""
        if self.uncertainty is None or self.uncertainty.method != "adf":
            raise RuntimeError("predict_moments needs an ADF model")
        with self._running():
            mean, var = self.net.moments_padded(self._tensor(batch))
        return mean.float().cpu().numpy(), var.float().cpu().numpy()


def model_kernel_spec(folder: str | os.PathLike, task: str, kernel: str, needs: str) -> KernelSpec:
    """The spec of ``kernel`` for a model folder of ``task``, keyed by its weights hash, so a
    resumed run can prove it uses the same weights; ``needs`` ends the wrong-task message."""
    card = read_card(folder)
    if card.task != task:
        raise ModelFileError(f"'{folder}' is a {card.task} model; {needs}.")
    card = verify_model(folder)
    return KernelSpec.of(kernel, model=os.path.abspath(folder), sha256=card.weights_sha256)
