"""What every step of a running workflow reads: its input, its shared output, the cluster, the
engine settings, and how a step's references become URLs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.engine.runner import EngineOptions
from pipeline.io import store
from pipeline.workflow.spec import INPUT, TRAINING, Denoise, Step, Workflow

STEPS_WORKSPACE = "_tilewise/steps"  # each step's resume manifest: OUT/_tilewise/steps/<name>


@dataclass(frozen=True)
class Context:
    """One workflow run's fixed parts, which every step reads."""

    workflow: Workflow
    input_url: str
    output_url: str
    client: Any
    options: EngineOptions  # the workflow's engine settings; each step gets its own workspace

    def options_for(self, step: Step) -> EngineOptions:
        return EngineOptions.of(self.options, workspace=f"{STEPS_WORKSPACE}/{step.name}")

    def model_dir(self, ref: str) -> str:
        """A training step's model folder (``OUT/models/<name>``), or a model folder's path."""
        named = next((s for s in self.workflow.steps if s.name == ref), None)
        if named is not None and named.step in TRAINING:
            return store.join(self.output_url, "models", ref)
        return ref

    def image_url(self, step: Step, ref: str | None) -> str:
        """``input`` is the input; a denoise step's name (and, by default, the denoised image
        when the workflow denoised before this step) is the output's root."""
        if ref == INPUT:
            return self.input_url
        if ref is not None:
            return self.output_url
        before = self.workflow.steps[:self.workflow.steps.index(step)]
        return self.output_url if any(isinstance(s, Denoise) for s in before) else self.input_url

    @property
    def root_written(self) -> bool:
        return self.workflow.denoise_step() is not None
