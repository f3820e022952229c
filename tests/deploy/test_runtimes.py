"""PyTorch backends that change how the model runs for speed (inductor, CUDA graphs) keep its outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selecsls
from selecsls.deploy import runtimes
from selecsls.deploy.backends import BACKENDS
from selecsls.deploy.runtimes import GemmConv2d
from sparse_models import tiny_spec, trained_like


def relative_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=2, padding=0, bias=False),
        dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 1)),
        dict(kernel_size=3, stride=1, padding=2, dilation=2),
    ],
)
def test_gemm_conv_equals_the_conv(kwargs):
    conv = nn.Conv2d(6, 5, **kwargs).eval()
    x = torch.randn(2, 6, 7, 10)
    with torch.no_grad():
        assert relative_diff(GemmConv2d(conv)(x), conv(x)) <= 1e-6


def test_gemm_conv_refuses_grouped_convs():
    with pytest.raises(ValueError, match="groups=1"):
        GemmConv2d(nn.Conv2d(4, 4, 3, groups=2))


@pytest.mark.parametrize("gemm_faster", [True, False])
def test_tuned_swaps_a_conv_only_where_the_product_was_faster_and_stays_exact(monkeypatch, gemm_faster):
    model = trained_like(selecsls.create_model(tiny_spec(), num_classes=10)).eval()
    gemm_seconds = 1.0 if gemm_faster else 3.0  # the conv takes 2.0
    monkeypatch.setattr(runtimes, "fastest_seconds", lambda fns, repeats: {"conv": 2.0, "gemm": gemm_seconds})
    example = torch.randn(1, 3, 64, 48)
    run = BACKENDS["tuned"].build(model, example)
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    swapped = [m for m in run.modules() if isinstance(m, GemmConv2d)]
    assert len(swapped) == (len(spatial) if gemm_faster else 0)
    with torch.no_grad():
        assert relative_diff(run(example), model(example)) <= 1e-5


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


def test_bench_and_predict_offer_the_one_backend_table():
    from selecsls.cli import build_parser
    from selecsls.deploy.backends import BACKENDS, predict_backends

    subcommands = build_parser()._subparsers._group_actions[0].choices
    predict_choices = next(a.choices for a in subcommands["predict"]._actions if a.dest == "backend")
    assert set(predict_choices) == {"auto", *predict_backends()} and set(predict_backends()) <= set(BACKENDS)
    bench_help = next(a.help for a in subcommands["bench"]._actions if a.dest == "backends")
    assert all(name in bench_help for name in BACKENDS)
