"""PyTorch backends that change how the model runs for speed (inductor, CUDA graphs) keep its outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selecsls
from selecsls.deploy.backends import BACKENDS
from sparse_models import tiny_spec, trained_like


@pytest.mark.slow  # inductor compiles C++ kernels: about a minute on 2 busy cores
def test_compiled_model_with_frozen_weights_equals_eager():
    model = trained_like(selecsls.create_model(tiny_spec(), num_classes=10)).eval()
    example, other = torch.randn(2, 1, 3, 64, 64)
    run = BACKENDS["compile"].build(model, example)
    with torch.no_grad():
        for x in (example, other):
            expected = model(x)
            assert float((run(x) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_cuda_graph_backends_capture_fp32_or_fp16_channels_last(monkeypatch):
    import selecsls.deploy.runtimes as runtimes

    captured = []
    monkeypatch.setattr(runtimes, "_captured", lambda model, example, *formats: captured.append(formats))
    runtimes.cuda_graphs(nn.Identity(), torch.zeros(1))
    runtimes.cuda_graphs_fp16(nn.Identity(), torch.zeros(1))
    assert captured == [(torch.float32, torch.contiguous_format), (torch.float16, torch.channels_last)]
    assert (BACKENDS["cuda_graphs"].exact, BACKENDS["cuda_graphs_fp16"].precision) == (True, "fp16")
