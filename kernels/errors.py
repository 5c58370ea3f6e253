"""Errors a kernel or a model folder raises when the user can fix the problem.

Kernels import nothing from ``pipeline``, so they have their own small family; the pipeline's
steps turn these into its ``TilewiseError`` family at their edge, and the CLI into exit code 2.
"""

from __future__ import annotations


class KernelError(ValueError):
    """A kernel cannot be built as asked (unknown name, bad parameter); the message names the fix."""


class ModelFileError(KernelError):
    """A model folder is missing, incomplete, of the wrong task, or does not match its card."""
