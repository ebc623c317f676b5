"""Whole ResNet-50: inference images/s, and training-step images/s with the step's peak memory.

``inference``: eval-mode forward under no_grad. ``training``: one SGD step (zero_grad, forward,
cross-entropy, backward, step with momentum) on synthetic images and labels that already live
on the device. Each competitor trains its own copy of the same initial model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import _harness, _resnet

CL = torch.channels_last
ARCH = "resnet50"
MODES = ("inference", "training")
NUM_CLASSES = 1000


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = _harness.settings(metafunc.config)
    _harness.parametrize(metafunc, [ARCH], MODES, _harness.competitors(settings))


def _training_step(model: nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


@dataclass
class ModelCase:
    case: _harness.Case
    model: nn.Module  # the eager model every competitor copies


def _build_case(case_name: str, mode: str, dtype_name: str, settings: _harness.Settings) -> ModelCase:
    dtype, device = _harness.DTYPES[dtype_name], settings.device
    training = mode == "training"
    batch, size = settings.batch, settings.image_size
    model = _resnet.build_model(case_name).train(training)
    meta = _resnet.meta_forward(model, (batch, 3, size, size))

    def make_inputs() -> tuple:
        images = torch.randn(batch, 3, size, size, device=device).to(dtype).contiguous(memory_format=CL)
        if not training:
            return (images,)
        return images, torch.randint(0, NUM_CLASSES, (batch,), device=device)

    inputs = _harness.Rotation(make_inputs, device)
    ref_dtype = _harness.reference_dtype(device)
    reference_model = copy.deepcopy(model).to(device=device, dtype=ref_dtype, memory_format=CL)
    model = model.to(device=device, dtype=dtype, memory_format=CL)
    images = inputs.first[0]
    # Checked output: the logits (of the train-mode forward for training: the step itself
    # returns only the loss, and its weights move).
    with _harness.reference_math(), torch.no_grad():
        reference = (reference_model(images.to(ref_dtype)),)
        eager = (model(images),)
    del reference_model

    images_bytes = _harness.tensor_bytes(inputs.first)
    params = _harness.state_bytes(model)
    logits = batch * NUM_CLASSES * images.element_size()
    if training:
        # Parameters read in the forward and the backward, gradients written, and SGD reading
        # parameter, gradient and momentum and writing parameter and momentum: 8x the weights.
        work = _harness.Work(3 * meta.flops, images_bytes + 8 * params, images=batch)
    else:
        work = _harness.Work(meta.flops, images_bytes + params + logits, images=batch)
    case = _harness.Case(
        suite="models", mode=mode, label=f"ResNet-50 {batch}x3x{size}x{size}", dtype=dtype, batch=batch,
        inference=not training, inputs=inputs,
        expected=_harness.Expected(reference, _harness.max_error(eager, reference)), work=work,
    )
    return ModelCase(case, model)


cached_case = _harness.cached_case(_build_case)


def test_resnet50(benchmark, request, bench_settings, case_name, mode, dtype_name, competitor):
    reason = _harness.skip_reason(competitor, bench_settings.device, _harness.DTYPES[dtype_name])
    if reason:
        pytest.skip(reason)
    prepared = cached_case(case_name, mode, dtype_name, bench_settings)
    model = _harness.module_for(competitor, prepared.model)

    if mode == "inference":
        _harness.run(benchmark, request.config, prepared.case, competitor, model)
    else:
        _harness.run(benchmark, request.config, prepared.case, competitor, _training_step(model),
                     outputs=lambda images, labels: model(images))
