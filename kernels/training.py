"""The training loop every model here shares: Adam, learning-rate decay on plateau, early
stopping on a validation loss, best checkpoint kept, a progress bar with the running loss.

Callers supply one step's loss and the validation loss; they know their data, masks and
losses, this knows only the schedule.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    state_dict: dict
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class TrainResult:
    """What every trainer returns: the best weights, the architecture (a ``UNetConfig``) they
    fit, and how training went; ``pipeline.steps.train`` turns it into a model folder."""

    state_dict: dict
    config: Any
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def fit(net: Any, train_loss: Callable[[int], Any], val_loss: Callable[[], float], *, steps: int, lr: float,
        val_every: int, patience: int, desc: str = "train", progress: bool = True,
        schedule: str = "plateau", checkpoint: str | None = None) -> FitResult:
    """Optimise ``net`` for at most ``steps`` steps; ``train_loss(step)`` returns a scalar tensor.

    ``schedule``: ``plateau`` halves the learning rate when the validation loss stalls;
    ``cosine`` anneals it to 1 % over ``steps`` (the denoisers': see ``kernels.denoise``).
    ``history[0]`` is the validation loss before training, so a card shows what training gained.
    ``checkpoint``: a file written at every validation (weights, optimiser, schedule, best so
    far, history) and once more when training ends; a call finding it continues from there (a
    finished one returns at once), so an interrupted training loses at most ``val_every``
    steps. The patches drawn after a resume differ from an uninterrupted run's.
    """
    import torch
    from tqdm.auto import tqdm

    def validate() -> float:
        net.eval()
        with torch.inference_mode():
            return float(val_loss())

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if schedule not in ("plateau", "cosine"):
        raise ValueError(f"unknown learning-rate schedule '{schedule}' (plateau or cosine)")
    cosine = schedule == "cosine"
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.01 * lr) if cosine else
             torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 2)))
    state = _resume(checkpoint, net, opt, sched)
    if state is None:
        state = {"step": 0, "best": float("inf"), "best_state": None, "stale": 0, "running": None, "seconds": 0.0,
                 "finished": False,
                 "history": [{"step": 0, "train_loss": None, "val_loss": validate(), "lr": lr, "seconds": 0.0}]}
    best, best_state, stale, history, running = (state["best"], state["best_state"], state["stale"],
                                                  state["history"], state["running"])
    started = time.perf_counter() - state["seconds"]
    if state["finished"]:
        return FitResult(best_state or net.state_dict(), best, history, state["seconds"])

    def save(step: int, finished: bool = False) -> None:
        if checkpoint:
            _save_checkpoint(checkpoint, {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                          "step": step, "best": best, "best_state": best_state, "stale": stale,
                                          "running": running, "history": history, "finished": finished,
                                          "seconds": time.perf_counter() - started})

    bar = tqdm(total=steps, initial=state["step"], desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    step = state["step"]
    for step in range(state["step"] + 1, steps + 1):
        net.train()
        loss = train_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cosine:
            sched.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.update(1)
        bar.set_postfix_str(f"loss {running:.4f}", refresh=False)
        if step % val_every == 0 or step == steps:
            current = validate()
            if not cosine:
                sched.step(current)
            history.append({"step": step, "train_loss": running, "val_loss": current,
                            "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - started})
            log.info("step %d: train %.5f, validation %.5f", step, running, current)
            if current < best - 1e-6:
                best, best_state, stale = current, copy.deepcopy(net.state_dict()), 0
            else:
                stale += 1
                if stale >= patience:
                    log.info("early stop at step %d (no validation gain for %d checks)", step, stale)
                    break
            save(step)
    bar.close()
    save(step, finished=True)
    return FitResult(best_state or net.state_dict(), best, history, time.perf_counter() - started)


def _resume(checkpoint: str | None, net: Any, opt: Any, sched: Any) -> dict | None:
    """The saved state of an interrupted (or finished) fit, loaded into ``net``, ``opt`` and
    ``sched``; None without a checkpoint."""
    import torch

    if not checkpoint or not os.path.exists(checkpoint):
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(state.pop("net"))
    opt.load_state_dict(state.pop("opt"))
    sched.load_state_dict(state.pop("sched"))
    if not state["finished"]:
        log.warning("resuming training at step %d from %s", state["step"], checkpoint)
    return state


def _save_checkpoint(path: str, state: dict) -> None:
    """Written beside, then renamed: an interruption while writing leaves the previous one."""
    import torch

    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def train_ensemble(train_member: Callable[[int], TrainResult], members: int) -> TrainResult:
    """A deep ensemble: ``train_member(k)`` trains member ``k`` (its own seed), one after the
    other; the weights become one ``state_dict`` with keys ``<k>.<name>`` (an ``nn.ModuleList``
    of the members, as ``kernels.modelfile.build_network`` rebuilds it)."""
    import numpy as np

    results = [train_member(k) for k in range(members)]
    state = {f"{k}.{name}": value for k, r in enumerate(results) for name, value in r.state_dict.items()}
    history = [{**h, "member": k} for k, r in enumerate(results) for h in r.history]
    return TrainResult(state, results[0].config, float(np.mean([r.best_val_loss for r in results])), history,
                       sum(r.seconds for r in results), results[0].device)
