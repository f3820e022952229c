"""PyTorch backends of :data:`selecsls.deploy.backends.BACKENDS` (eager, frozen, channels-last, inductor,
BN-fused, GEMM-tuned, CUDA graphs, pruned): each turns a model and an example into a runner."""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch._inductor.config
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from selecsls._timing import fastest_seconds
from selecsls.compress.pruning import prune_to_budget
from selecsls.deploy.backends import BACKENDS, BackendUnavailable, Runner, first_line
from selecsls.deploy.freeze import freeze
from selecsls.models.conv import conv2d_as_matmul
from selecsls.models.fusion import fuse
from selecsls.models.network import SelecSLS

#: Budget of the ``pruned`` backends, as a fraction of the fused model's MACs. With random
#: weights no channel is free to remove, so this budget alone decides the pruned width.
PRUNED_MACS_FRACTION = 0.5


def eager(model: nn.Module, example: Tensor) -> Runner:
    """Plain PyTorch, NCHW memory layout."""
    return model


def frozen(model: nn.Module, example: Tensor) -> Runner:
    """:func:`selecsls.freeze`, its weights packed for the example's shape (by a first call on it)."""
    try:
        snapshot = freeze(model)
    except (TypeError, ValueError) as exc:  # torch.fx cannot trace it, or its weights are not float32 CPU ones
        raise BackendUnavailable(first_line(exc)) from exc
    snapshot(example)
    return snapshot


def channels_last(model: nn.Module, example: Tensor) -> Runner:
    """Eager with weights and input in NHWC (channels-last) memory layout."""
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return lambda x: converted(x.contiguous(memory_format=torch.channels_last))


#: Inductor settings of the ``compile`` backend (``benchmarks/inductor_settings.py`` measures the
#: alternatives). Freezing makes the weights constants: BatchNorm is folded and every conv weight is
#: laid out (prepacked) for oneDNN once, at compile time. Unfrozen, inductor takes the weights as
#: inputs and copies every 3x3 weight to channels-last layout on every call (~100 MB per image for
#: selecsls60, whose head holds ~26 M 3x3 parameters): the compiled model was slower than eager.
COMPILE_SETTINGS = {"freezing": True}


def compile_inductor(model: nn.Module, example: Tensor) -> Runner:
    """``torch.compile`` (inductor) with :data:`COMPILE_SETTINGS`, compiled here on the example (so
    timing excludes compilation) for inference: later calls must run under ``torch.no_grad``."""
    compiled = torch.compile(model)
    try:
        # torch.compile(options=) ignores ``freezing`` in torch 2.13; the config applies when the
        # first call compiles.
        with torch.no_grad(), torch._inductor.config.patch(COMPILE_SETTINGS):
            compiled(example)
    except Exception as exc:  # inductor needs a working C++ (CPU) or Triton (GPU) toolchain at run time
        raise BackendUnavailable(f"torch.compile failed: {first_line(exc)}") from exc
    return compiled


def fused_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with BatchNorm folded into the convs, on ``device``: ``selecsls.fuse`` for
    SelecSLS, torch.fx conv-BN fusion otherwise."""
    if isinstance(model, SelecSLS):
        return fuse(model).to(device)  # fuse builds the new model on the CPU
    try:
        return fx_fuse(model)
    except Exception as exc:  # models that torch.fx cannot trace
        raise BackendUnavailable(f"torch.fx conv-BN fusion failed: {first_line(exc)}") from exc


def fused(model: nn.Module, example: Tensor) -> Runner:
    """BatchNorm folded into the convs: ``selecsls.fuse`` for SelecSLS, torch.fx conv-BN fusion otherwise."""
    return fused_model(model, example.device).eval()


def fused_channels_last(model: nn.Module, example: Tensor) -> Runner:
    """BatchNorm folded into the convs, weights and input in channels-last layout."""
    return channels_last(fused_model(model, example.device).eval(), example)


def _captured(model: nn.Module, example: Tensor, dtype: torch.dtype, memory_format: torch.memory_format) -> Runner:
    """The fused model's forward pass on ``example``'s shape, captured once as a CUDA graph.

    At batch 1 a GPU spends most of a forward pass launching kernels (every model took 3-6 ms on
    an H200, whatever its MACs); replaying a captured graph launches them all at once. Inputs are
    copied into the graph's static input (converted to ``dtype`` and ``memory_format``); the
    output is returned as a new fp32 tensor, so a later replay cannot overwrite it.
    """
    network = fused_model(model, example.device).eval().to(dtype=dtype, memory_format=memory_format)
    static_input = example.to(dtype=dtype, memory_format=memory_format, copy=True)
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side_stream):
        for _ in range(3):  # cudnn autotuning and allocator warm-up stay outside the graph
            network(static_input)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_output = network(static_input)

    def run(x: Tensor) -> Tensor:
        static_input.copy_(x)
        graph.replay()
        return static_output.to(torch.float32, copy=True)

    return run


def cuda_graphs(model: nn.Module, example: Tensor) -> Runner:
    """BatchNorm folded, the forward pass captured once as a CUDA graph and replayed."""
    return _captured(model, example, torch.float32, torch.contiguous_format)


def cuda_graphs_fp16(model: nn.Module, example: Tensor) -> Runner:
    """:func:`cuda_graphs` in fp16 and channels-last layout (the tensor cores' preferred input)."""
    return _captured(model, example, torch.float16, torch.channels_last)


class GemmConv2d(nn.Module):
    """An ``nn.Conv2d`` (groups 1, zero padding) computed by :func:`~selecsls.models.conv.conv2d_as_matmul`.

    PyTorch's eager conv copies its weight into oneDNN's blocked layout on every call; for large
    weights at batch 1 that copy outweighs the arithmetic, and this product reads the weight in
    place (selecsls60's head.2 on the development EPYC: 36 ms as a conv, 7 ms as this product).
    SelecSLS's own large convs run as this product on small maps in eval mode
    (:class:`~selecsls.models.conv.SmallMapConv2d`); :func:`tuned` times conv and product for every
    spatial conv of any model; :func:`frozen` packs every weight once instead.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("GemmConv2d needs a conv with groups=1 and numeric zero padding")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


#: :func:`tuned` swaps a conv for :class:`GemmConv2d` only when the product is at least this much
#: faster (fastest of :data:`TUNING_REPEATS` interleaved calls each): small differences are timing noise.
TUNING_MARGIN, TUNING_REPEATS = 1.2, 5


def tuned(model: nn.Module, example: Tensor) -> Runner:
    """BatchNorm folded, then every spatial conv timed at its input shape for ``example`` as oneDNN's
    conv and as :class:`GemmConv2d`; the product replaces the conv where it is faster."""
    network = fused_model(model, example.device).eval()
    convs = {
        name: conv
        for name, conv in network.named_modules()
        if isinstance(conv, nn.Conv2d)
        and conv.kernel_size != (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    }
    inputs: dict[str, Tensor] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs[name] = args[0]

        return record

    hooks = [conv.register_forward_pre_hook(recorder(name)) for name, conv in convs.items()]
    with torch.no_grad():
        network(example)
        for hook in hooks:
            hook.remove()
        for name, conv in convs.items():
            gemm, x = GemmConv2d(conv), inputs[name]
            # nn.Conv2d.forward: oneDNN's conv, whatever a SmallMapConv2d would choose in eval mode.
            candidates = {"conv": partial(nn.Conv2d.forward, conv, x), "gemm": partial(gemm, x)}
            seconds = fastest_seconds(candidates, TUNING_REPEATS)
            if seconds["conv"] > TUNING_MARGIN * seconds["gemm"]:
                parent, _, attribute = name.rpartition(".")
                setattr(network.get_submodule(parent), attribute, gemm)
    return network


def _pruned_model(model: nn.Module, example: Tensor) -> nn.Module:
    """``selecsls.prune_to_budget(model, macs=PRUNED_MACS_FRACTION)`` on the example's device."""
    if not isinstance(model, SelecSLS):
        raise BackendUnavailable("pruning applies to SelecSLS models only")
    cpu_copy = copy.deepcopy(model).cpu()  # pruning is planned on the CPU, whatever the benchmark device
    smaller = prune_to_budget(cpu_copy, macs=PRUNED_MACS_FRACTION, input_size=(1, *example.shape[1:]))
    return smaller.to(example.device).eval()


def pruned(model: nn.Module, example: Tensor) -> Runner:
    """``selecsls.prune_to_budget(model, macs=PRUNED_MACS_FRACTION)`` (SelecSLS only): fused and narrower."""
    return _pruned_model(model, example)


def pruned_int8(model: nn.Module, example: Tensor) -> Runner:
    """The ``pruned`` model run by the ``int8`` backend: the two speed-ups compound."""
    return BACKENDS["int8"].build(_pruned_model(model, example), example)
