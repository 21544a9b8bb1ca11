"""Training on an NVIDIA GPU: the loop moves the model and batches to CUDA, uses AMP there, and learns.

Runs under ``make test-gpu`` (and wherever ``-m gpu`` is selected on a machine with CUDA); elsewhere it skips
with the reason.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_a_tiny_teacher_trains_on_cuda_with_amp():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA and a CUDA build of torch (make test-gpu)")
    from toolchain import engine
    from toolchain.config import DataConfig, ModelConfig
    from toolchain.data import load_splits
    from toolchain.models import build_model
    from toolchain.tasks import get_train_task

    engine.set_seed(0)
    splits = load_splits(DataConfig(), seed=0)
    spec, task = splits.input_spec, get_train_task()
    model = build_model(ModelConfig(width=8, depth=1), input_shape=spec.sample_shape, num_classes=10)
    train = (engine.normalise(splits.train[0], spec), torch.from_numpy(splits.train[1]))
    val = (engine.normalise(splits.val[0], spec), torch.from_numpy(splits.val[1]))
    state = engine.fit(model, loss_fn=task.loss(), metric=task.model_metric, train=train, val=val,
                       opts=engine.FitOptions(epochs=3, lr=3e-3, batch_size=64, amp=True, progress=False))
    assert next(model.parameters()).device.type == "cuda"  # fit moved it; AMP was on (amp=True, CUDA present)
    assert state.best_acc > 0.8, state.history
