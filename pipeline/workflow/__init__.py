"""Workflows: steps composed into one run over one input into one output store.

``Pipeline([...steps]).run(IN, OUT)`` from Python, or ``tilewise run WORKFLOW.yaml IN OUT``;
both build the same :class:`~pipeline.workflow.spec.Workflow`, so they write the same store.
"""

from pipeline.workflow.load import dump_workflow, load_workflow, parse_workflow
from pipeline.workflow.run import Pipeline, WorkflowSummary, run_workflow
from pipeline.workflow.spec import (
    Denoise,
    EngineSettings,
    Embed,
    Evaluate,
    Report,
    RunKernel,
    Segment,
    Step,
    TrainDenoiser,
    TrainSegmenter,
    Workflow,
)

__all__ = ["Denoise", "Embed", "EngineSettings", "Evaluate", "Pipeline", "Report", "RunKernel", "Segment", "Step",
           "TrainDenoiser", "TrainSegmenter", "Workflow", "WorkflowSummary", "dump_workflow", "load_workflow",
           "parse_workflow", "run_workflow"]
