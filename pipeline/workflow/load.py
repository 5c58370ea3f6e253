"""Workflows from YAML (``yaml.safe_load``) and their errors as one line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.core.errors import InputError
from pipeline.workflow.spec import Workflow


def _where(loc: tuple, data: Any) -> str:
    """``steps[2] (segment).diamter`` from pydantic's location, naming steps by their kind."""
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int):
            parts[-1] += f"[{key}]"
            node = node[key] if isinstance(node, list) and key < len(node) else None
            if isinstance(node, dict) and "step" in node:
                parts[-1] += f" ({node['step']})"
            continue
        if isinstance(node, dict) and "step" in node and key == node.get("step"):
            continue  # pydantic's tag of the union member: already shown
        parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "workflow"


def explain(exc: ValidationError, data: Any) -> str:
    """The first problem of a validation error as one sentence (a misspelt key first: it
    usually explains a "missing" one)."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = _where(tuple(error["loc"]), data)
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key (check its spelling in the YAML reference of the README)"
    if kind == "missing":
        return f"{where}: missing (required)"
    if kind == "union_tag_invalid":
        tags = error.get("ctx", {}).get("expected_tags", "")
        given = error.get("input")
        given = given.get("step") if isinstance(given, dict) else given
        return f"{where}: unknown step '{given}'; known steps: {tags}"
    if kind == "union_tag_not_found":
        return f"{where}: each step needs 'step:' (its kind)"
    msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}" + (f" (got {error['input']!r})" if kind not in ("value_error",) and
                                 not isinstance(error.get("input"), (dict, list)) else "")


def parse_workflow(data: Any, *, source: str = "workflow") -> Workflow:
    if not isinstance(data, dict):
        raise InputError(f"{source}: a workflow is a mapping with 'steps:' (a list of steps), "
                         f"not {type(data).__name__}.")
    try:
        return Workflow.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{source}: {explain(exc, data)}.") from None


def load_workflow(path: str) -> Workflow:
    """A workflow file, validated; every problem is an ``InputError`` naming the key."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise InputError(f"No workflow file at '{path}'; the shipped ones are in workflows/ (lightsheet.yaml, "
                         "wholeslide.yaml, denoise.yaml).")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None
    return parse_workflow(data, source=path)


def dump_workflow(workflow: Workflow) -> str:
    """The workflow as YAML (every default written out: what ran)."""
    import yaml

    return yaml.safe_dump(workflow.model_dump(mode="json"), sort_keys=False)
