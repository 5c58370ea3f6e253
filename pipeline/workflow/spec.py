"""What a workflow is: steps as small validated objects, and the workflow that orders them.

The same classes are the Python API and the YAML format: ``Segment(model="segmenter")`` in a
script and ``- step: segment\n  model: segmenter`` in a file build the same object, so both give
the same store. Every class refuses unknown keys and wrong types (pydantic), and
:class:`Workflow` checks what only the whole sequence can tell: names are unique, references
name an earlier step, and steps come in an order that can run.

Names address outputs: a training step's model is ``OUT/models/<name>``; ``denoise`` writes the
output's root image (the one later steps segment, by its name); ``segment`` writes
``OUT/labels/<name>`` and ``OUT/tables/<name>``; ``kernel`` writes the image ``OUT/<name>``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kernels.posterior import Choice

INPUT = "input"  # the image reference meaning the workflow's input
RESERVED = {"labels", "tables", "uncertainty", "models", "reports", "_tilewise"}  # folders of the output


class Step(BaseModel):
    """One step: ``name`` addresses its output for later steps (default: the step's kind)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    step: str
    name: str = ""

    @model_validator(mode="after")
    def _default_name(self) -> "Step":
        if not self.name:
            object.__setattr__(self, "name", self.default_name())
        if "/" in self.name or "\\" in self.name or self.name.startswith(".") or self.name == INPUT:
            raise ValueError(f"name '{self.name}' cannot be used: a name is one path component, not 'input'")
        return self

    def default_name(self) -> str:
        return self.step

    def references(self) -> dict[str, tuple[str, ...]]:
        """Fields naming other steps, with the kinds they may name (a path is also accepted
        where the kind trains a model)."""
        return {}


class Training(Step):
    """What both training steps share; unset (null) sizes come from the machine (fewer steps,
    smaller patches and networks on a CPU: ``pipeline.workflow.execute.training_size``)."""

    steps: int | None = Field(None, ge=1)
    patch: list[int] | None = None
    batch: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=4)
    seed: int = 0
    samples: int | None = Field(None, ge=2)  # mc-dropout passes at inference
    members: int | None = Field(None, ge=2)  # ensemble networks


class TrainDenoiser(Training):
    """Train a denoiser on the input (self-supervised; ``care`` / ``n2n`` take ``target``)."""

    step: Literal["train-denoiser"] = "train-denoiser"
    method: Literal["n2v2", "n2s", "care", "n2n"] = "n2v2"
    target: str | None = None
    loss: Literal["mse", "mae"] = "mse"
    depth: int = Field(2, ge=1, le=5)
    uncertainty: Literal["mc-dropout", "ensemble"] | None = None

    def default_name(self) -> str:
        return "denoiser"

    @model_validator(mode="after")
    def _pairs(self) -> "TrainDenoiser":
        if self.method in ("care", "n2n") and not self.target:
            raise ValueError(f"method {self.method} trains on pairs: give target (the "
                             f"{'clean' if self.method == 'care' else 'second noisy'} image of the same field)")
        if self.method in ("n2v2", "n2s") and self.target:
            raise ValueError(f"target applies to method care or n2n, not {self.method}")
        return self


class TrainSegmenter(Training):
    """Train the 3-class U-Net on ``labels`` (annotations inside the input) and the image the
    workflow segments: the denoised one when it denoised first (``image`` chooses), so the
    network sees at training what it sees at inference."""

    step: Literal["train-segmenter"] = "train-segmenter"
    image: str | None = None  # as for segment: default the denoised image (with the input's labels), if any
    labels: str = "nuclei"
    depth: int = Field(3, ge=1, le=5)
    uncertainty: Literal["adf", "mc-dropout", "ensemble"] | None = None

    def default_name(self) -> str:
        return "segmenter"

    def references(self) -> dict[str, tuple[str, ...]]:
        return {"image": ("denoise",)}


class Denoise(Step):
    """Denoise the input with a model (a ``train-denoiser`` step's name, or a model folder) into
    the output's root image."""

    step: Literal["denoise"] = "denoise"
    model: str
    tta: Literal["auto", "on", "off"] = "auto"
    # N2V2 / Noise2Self: the posterior step (``kernels.posterior``): auto does what training chose
    posterior: Literal["auto"] | Choice = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    dtype: str = "float32"

    def default_name(self) -> str:
        return "denoised"

    def references(self) -> dict[str, tuple[str, ...]]:
        return {"model": ("train-denoiser",)}


class Segment(Step):
    """Instance labels, stitched across tiles, with their table (and uncertainty maps when the
    segmenter was trained with ``uncertainty``). ``image``: ``input`` or a ``denoise`` step's
    name (default: the denoised image when the workflow denoises); ``model``: a
    ``train-segmenter`` step's name or a model folder; without one, the classical watershed."""

    step: Literal["segment"] = "segment"
    image: str | None = None
    model: str | None = None
    diameter: float | None = Field(None, gt=0)
    threshold: float | None = None
    min_size: int | None = Field(None, ge=0)
    polarity: Literal["auto", "bright", "dark"] = "auto"
    stain: Literal["auto", "none", "hematoxylin"] = "auto"
    samples: int | None = Field(None, ge=2, description="mc-dropout passes (a model trained with mc-dropout)")
    iou: float = Field(0.5, gt=0, le=1)
    rescale: bool = True

    def default_name(self) -> str:
        return "nuclei"

    def references(self) -> dict[str, tuple[str, ...]]:
        return {"image": ("denoise",), "model": ("train-segmenter",)}


class Embed(Step):
    """Per-object embeddings (a model's encoder, beside untrained, pixel and structure
    baselines) as ``embed_*`` columns of the ``labels`` step's table."""

    step: Literal["embed"] = "embed"
    labels: str = "nuclei"
    model: str | None = None
    seeds: int = Field(3, ge=0)
    crop: float | None = Field(None, gt=0)

    def references(self) -> dict[str, tuple[str, ...]]:
        return {"labels": ("segment",), "model": ("train-segmenter", "train-denoiser")}


class Evaluate(Step):
    """Scores of the ``labels`` step (and its uncertainty maps) against ground-truth labels:
    ``truth`` is a labels name inside the input (``nuclei``) or a labels image URL."""

    step: Literal["evaluate"] = "evaluate"
    labels: str = "nuclei"
    truth: str = "nuclei"

    def references(self) -> dict[str, tuple[str, ...]]:
        return {"labels": ("segment",)}


class RunKernel(Step):
    """Any registered kernel with dense output, tile by tile, into the image ``OUT/<name>``."""

    step: Literal["kernel"] = "kernel"
    kernel: str
    params: dict[str, Any] = Field(default_factory=dict)
    image: str | None = None  # as for segment: default the denoised image, if any
    dtype: str = "float32"

    def default_name(self) -> str:
        return self.kernel

    @model_validator(mode="after")
    def _free_folder(self) -> "RunKernel":
        if self.name in RESERVED:
            raise ValueError(f"name '{self.name}' is a folder of the output ({', '.join(sorted(RESERVED))}); "
                             "the kernel's image is OUT/<name>: choose another name")
        return self

    def references(self) -> dict[str, tuple[str, ...]]:
        return {"image": ("denoise",)}


class Report(Step):
    """A self-contained HTML page of the run: input beside the denoised image, labels over the
    image, an uncertainty map, the embedding map, scores against ground truth, step timings."""

    step: Literal["report"] = "report"


AnyStep = Annotated[Union[TrainDenoiser, TrainSegmenter, Denoise, Segment, Embed, Evaluate, RunKernel, Report],
                    Field(discriminator="step")]
TRAINING = ("train-denoiser", "train-segmenter")


class EngineSettings(BaseModel):
    """Engine settings every tiled step of the workflow shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    level: int = Field(0, ge=0)
    tile: list[int] | None = None
    batch: int = Field(1, ge=1)
    ngff: Literal["0.4", "0.5"] | None = None
    missing_chunks: Literal["fill", "error"] = "fill"
    foreground: str | None = None  # "tissue" (slides: detect once, skip glass) or a mask's URL
    # a denoise step and a segment step of its output right after it run as one task per tile
    # (pipeline.engine.fused); same store, but slower on the demo (1.15x with the U-Net, 1.64x
    # with the watershed, bench_workflow): off by default (README, "Fused steps")
    fuse: bool = False


class Workflow(BaseModel):
    """Steps run in order over one input into one output store."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "workflow"
    description: str = ""
    engine: EngineSettings = EngineSettings()
    steps: list[AnyStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _sequence(self) -> "Workflow":
        seen: dict[str, str] = {}  # name -> kind, of the steps before the one checked
        every = {s.name for s in self.steps}
        for i, step in enumerate(self.steps):
            where = f"steps[{i}] ({step.step} '{step.name}')"
            if step.name in seen:
                raise ValueError(f"{where}: name '{step.name}' is used by an earlier step; give each step its own name")
            for key, kinds in step.references().items():
                ref = getattr(step, key)
                if ref is None or (key == "image" and ref == INPUT):
                    continue
                if seen.get(ref) in kinds:
                    continue
                if ref in every or set(kinds) <= {"denoise", "segment"}:
                    raise ValueError(f"{where}: {key} '{ref}' must name an earlier {' or '.join(kinds)} step"
                                     + (" (or be 'input')" if key == "image" else ""))
                # otherwise a model folder's path: checked when the workflow runs
            seen[step.name] = step.step
        kinds = [s.step for s in self.steps]
        if kinds.count("denoise") > 1:
            raise ValueError("a workflow denoises at most once: the denoised image is the output's root image")
        if "denoise" in kinds and "segment" in kinds and kinds.index("segment") < kinds.index("denoise"):
            segment = self.steps[kinds.index("segment")]
            if segment.image in (None, INPUT):
                raise ValueError("segment comes before denoise: the output's root image would be written twice; "
                                 "put denoise first")
        return self

    def denoise_step(self) -> Denoise | None:
        return next((s for s in self.steps if isinstance(s, Denoise)), None)
