"""Kernel specs for trained model folders: the one place a step turns a folder into a spec."""

from __future__ import annotations

from typing import Any

from kernels import KernelError, KernelSpec
from kernels.modelfile import model_kernel_spec
from pipeline.core.errors import OptionError

# task in the card -> (kernel that runs it, what to tell a user who gave another task's model)
MODEL_KERNELS = {
    "denoise": ("denoise", "`tilewise denoise` needs a denoising model (`tilewise train denoise`)"),
    "segment": ("segment-unet", "segmentation needs one from `tilewise train segment`"),
}


def model_spec(model_dir: str, task: str, **params: Any) -> KernelSpec:
    """The kernel spec that runs a model folder of ``task``, keyed by its weights hash (so a
    resumed run proves it uses the same weights), with extra kernel ``params``; a missing,
    changed or wrong-task folder is a one-line :class:`OptionError`."""
    kernel, needs = MODEL_KERNELS[task]
    try:
        spec = model_kernel_spec(model_dir, task, kernel, needs)
    except KernelError as exc:
        raise OptionError(str(exc)) from None
    return spec.with_params(**params) if params else spec


def check_model_folder(model_dir: str, what: str) -> None:
    """Refuse (one line, naming ``what``) a path that is not a readable tilewise model folder."""
    from kernels.modelfile import read_card

    try:
        read_card(model_dir)
    except KernelError as exc:
        raise OptionError(f"{what}: {exc}") from None
