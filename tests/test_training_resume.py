"""Training checkpoints: an interrupted fit continues from its last validation, a finished one
returns at once, and `train_denoise(resume=True)` leaves a model folder without checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from kernels.training import fit


def _problem():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def train_loss(step):
        return torch.nn.functional.mse_loss(net(x), y)

    def val_loss():
        return float(torch.nn.functional.mse_loss(net(x), y))

    return net, train_loss, val_loss


def test_an_interrupted_fit_resumes_from_its_checkpoint(tmp_path, caplog):
    ckpt = str(tmp_path / "checkpoint.pt")
    net, train_loss, val_loss = _problem()
    whole = fit(net, train_loss, val_loss, steps=40, lr=0.05, val_every=10, patience=10, progress=False)

    net, train_loss, val_loss = _problem()

    def interrupted(step):
        if step == 25:
            raise KeyboardInterrupt
        return train_loss(step)

    with pytest.raises(KeyboardInterrupt):
        fit(net, interrupted, val_loss, steps=40, lr=0.05, val_every=10, patience=10, progress=False,
            checkpoint=ckpt)
    net, train_loss, val_loss = _problem()  # a new process: fresh weights, restored from the file
    steps_run = []

    def counted(step):
        steps_run.append(step)
        return train_loss(step)

    with caplog.at_level(logging.WARNING):
        resumed = fit(net, counted, val_loss, steps=40, lr=0.05, val_every=10, patience=10, progress=False,
                      checkpoint=ckpt)
    assert "resuming training at step 20" in caplog.text
    assert steps_run == list(range(21, 41))
    assert [h["step"] for h in resumed.history] == [0, 10, 20, 30, 40]
    # full-batch and deterministic: the resumed run ends where the uninterrupted one did
    np.testing.assert_allclose(resumed.best_val_loss, whole.best_val_loss, rtol=1e-5)
    again = fit(net, lambda s: pytest.fail("a finished fit trains no more"), val_loss, steps=40, lr=0.05,
                val_every=10, patience=10, progress=False, checkpoint=ckpt)
    assert again.best_val_loss == resumed.best_val_loss


def test_train_denoise_resume_leaves_no_checkpoint(tmp_path, client):
    from pipeline.data.synthetic import make_lightsheet
    from pipeline.steps.train import CHECKPOINT, train_denoise

    url = str(tmp_path / "ls.ome.zarr")
    make_lightsheet(url, client, shape=(16, 48, 48), progress=False)
    model = tmp_path / "n2v2.model"
    model.mkdir()
    card = train_denoise(url, str(model), steps=4, batch=2, patch=(8, 32, 32), width=8, progress=False, resume=True)
    assert card.weights_sha256 and not list(Path(model).glob(CHECKPOINT + "*"))
