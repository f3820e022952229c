"""The conv of every SelecSLS layer: ``nn.Conv2d`` that runs the large head convs fast.

:class:`SmallMapConv2d` (same parameters, same state dict as ``nn.Conv2d``) runs a large conv as
im2col + one matrix product (:func:`conv2d_as_matmul`) where that is faster and exact: in training
on 1x1/2x2 maps, in eval on the CPU where timing says so (no per-call weight reorder).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from selecsls._timing import fastest_seconds

__all__ = ["EVAL_ALGORITHM_ENV", "EVAL_ALGORITHMS", "SmallMapConv2d", "conv2d_as_matmul", "eval_conv_choices"]


def _live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> Tuple[int, int, int]:
    """Along one axis: the first and last kernel tap that reads real input, and the output size.

    Taps before the first or after the last only ever multiply zero padding.
    """
    out_size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    first, last = kernel, -1
    for tap in range(kernel):
        for out in range(out_size):
            if 0 <= out * stride - padding + tap * dilation < size:
                first, last = min(first, tap), max(last, tap)
    return first, last, out_size


#: Environment variable that sets :attr:`SmallMapConv2d.eval_algorithm` when this module is imported.
EVAL_ALGORITHM_ENV = "SELECSLS_CONV_ALGORITHM"
EVAL_ALGORITHMS = ("auto", "conv", "matmul")
#: Timed calls of each algorithm (after one warm-up call) behind an "auto" choice, and how much
#: faster a spatial conv must be to be kept: it copies its weight on every call and the product
#: does not, so it must clearly pay for the copy. At batch 1 on the development EPYC the product
#: was at most 15% slower on any head conv and up to 4x faster; with 2 threads and another job
#: running, timing noise picked the conv for near-ties at a margin of 1.2. 1x1 convs copy nothing:
#: the faster wins.
EVAL_CHOICE_REPEATS, EVAL_CONV_MARGIN = 3, 1.5


def _eval_algorithm_from_env() -> str:
    value = os.environ.get(EVAL_ALGORITHM_ENV, "auto")
    if value not in EVAL_ALGORITHMS:
        raise ValueError(f"{EVAL_ALGORITHM_ENV}={value!r}: expected one of {', '.join(EVAL_ALGORITHMS)}")
    return value


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) that runs SelecSLS's large head convs fast.

    Training at 32-64 px: the head runs convs with up to 1280 channels on 2x2 and 1x1 maps, where
    oneDNN's backward is slow: measured per layer (forward + backward, batch 32), weights of 1M+
    elements ran 1.2-4.3x faster as one matrix product, smaller ones up to 2x slower
    (docs/cifar10.md). So when training, the output map has at most ``gemm_max_output_pixels``
    pixels and the weight at least ``gemm_min_weight_elements`` elements, the conv runs as im2col +
    one matrix product over only the kernel taps that read real input (1 of 9 on a 1x1 map): the
    same sums in another order, and autograd gives the skipped taps exactly zero gradient, as the
    conv does.

    Eval mode on the CPU: PyTorch's eager conv copies the whole weight into oneDNN's blocked layout
    on every call (``ONEDNN_VERBOSE=1`` shows the reorder). For selecsls60's 37.7 MB head.2 that
    copy took 25 ms against 6 ms of arithmetic, and its buffer, above glibc's largest mmap
    threshold (32 MiB), is mapped afresh on every call: the process grew by the weight's size per
    image. The im2col product reads the weight in place. With :attr:`eval_algorithm` "auto" (the
    default) a conv with a weight of ``gemm_min_weight_elements`` or more times both on its first
    call per input shape, dtype, thread count and autocast state (one slower first call, as with
    ``torch.backends.cudnn.benchmark``) and keeps the faster, the conv of a spatial kernel only when
    ``EVAL_CONV_MARGIN`` times faster (:attr:`eval_choices` records it); "conv" always runs the
    conv, "matmul" the product. Both are exact (about 5e-7 relative in float32).
    TorchScript, tracing (ONNX export), ``torch.compile``, dispatch modes (FLOP counting), other
    devices and channels-last inputs always see the plain conv.
    """

    __constants__ = [*nn.Conv2d.__constants__, "gemm_max_output_pixels", "gemm_min_weight_elements", "eval_algorithm"]
    __jit_ignored_attributes__ = ["eval_choices"]  # eager-only state; scripted models always run the conv
    gemm_max_output_pixels = 4
    gemm_min_weight_elements = 2**20
    #: "auto", "conv" or "matmul" (see the class docstring); the class attribute sets every layer,
    #: an instance attribute one. Default from the ``SELECSLS_CONV_ALGORITHM`` environment variable.
    eval_algorithm = _eval_algorithm_from_env()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The "auto" choices made so far: "input shape dtype, threads=N[, autocast]" -> "conv" or "matmul".
        self.eval_choices: Dict[str, str] = {}

    def large(self) -> bool:
        """Whether this conv may run as the matrix product (in training on tiny maps, in eval by choice)."""
        large = self.weight.numel() >= self.gemm_min_weight_elements
        return large and self.groups == 1 and self.padding_mode == "zeros"

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if self.large():
                rows = _live_taps(x.shape[-2], self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])
                cols = _live_taps(x.shape[-1], self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1])
                some_input_read = rows[0] <= rows[1] and cols[0] <= cols[1]  # else the output is the bias alone
                if some_input_read and rows[2] * cols[2] <= self.gemm_max_output_pixels:
                    return self._gemm_forward(x, rows, cols)
        elif self.eval_algorithm != "conv" and not torch.jit.is_scripting():
            return self._eval_forward(x)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _eval_forward(self, x: Tensor) -> Tensor:
        """The eval-mode conv as :attr:`eval_algorithm` says, where the product can stand in for it."""
        if (
            torch.jit.is_tracing()  # ONNX export, torch.jit.trace: the graph keeps the conv
            or torch.compiler.is_compiling()
            or is_in_torch_dispatch_mode()  # FLOP counters, fake tensors: tools that intercept ops
            or not self.large()
            or type(x) is not Tensor  # tensor subclasses (fake, functional) and torch.fx proxies
            or x.device.type != "cpu"
            or not (x.is_contiguous() and self.weight.is_contiguous())
            or isinstance(self.padding, str)
        ):
            return self._conv_forward(x, self.weight, self.bias)
        matmul = partial(conv2d_as_matmul, x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.eval_algorithm == "matmul":
            return matmul()
        key = f"{'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')}, threads={torch.get_num_threads()}"
        key += ", autocast" if torch.is_autocast_enabled("cpu") else ""
        choice = self.eval_choices.get(key)
        if choice is None:
            seconds = fastest_seconds(
                {"conv": partial(self._conv_forward, x, self.weight, self.bias), "matmul": matmul}, EVAL_CHOICE_REPEATS
            )
            margin = 1.0 if self.kernel_size == (1, 1) else EVAL_CONV_MARGIN
            choice = "conv" if margin * seconds["conv"] < seconds["matmul"] else "matmul"
            self.eval_choices[key] = choice
        return matmul() if choice == "matmul" else self._conv_forward(x, self.weight, self.bias)

    def _gemm_forward(self, x: Tensor, rows: Tuple[int, int, int], cols: Tuple[int, int, int]) -> Tensor:
        (top, bottom, out_h), (left, right, out_w) = rows, cols
        stride, dilation = self.stride, self.dilation
        weight = self.weight[:, :, top : bottom + 1, left : right + 1]
        # Pad (or crop: negative) so the trimmed kernel reads the same input positions as the full one.
        pad_top, pad_left = self.padding[0] - top * dilation[0], self.padding[1] - left * dilation[1]
        pad_bottom = (out_h - 1) * stride[0] - pad_top + (bottom - top) * dilation[0] - x.shape[-2] + 1
        pad_right = (out_w - 1) * stride[1] - pad_left + (right - left) * dilation[1] - x.shape[-1] + 1
        if pad_top != 0 or pad_bottom != 0 or pad_left != 0 or pad_right != 0:
            x = F.pad(x, [pad_left, pad_right, pad_top, pad_bottom])
        return conv2d_as_matmul(x, weight, self.bias, stride, (0, 0), dilation)


def conv2d_as_matmul(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tensor:
    """``F.conv2d`` (groups 1, zero padding) as im2col + one matrix product (``F.unfold`` + ``matmul``):
    the same sums in another order (about 5e-7 relative in float32)."""
    out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    columns = F.unfold(x, [weight.shape[2], weight.shape[3]], dilation, padding, stride)
    out = torch.matmul(weight.reshape(weight.shape[0], -1), columns)
    out = out.reshape(x.shape[0], weight.shape[0], out_h, out_w)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def eval_conv_choices(model: nn.Module) -> Dict[str, Dict[str, str]]:
    """The "auto" choices of ``model``'s large convs so far: conv name -> {input: "conv" or "matmul"}."""
    return {
        name: dict(module.eval_choices)
        for name, module in model.named_modules()
        if isinstance(module, SmallMapConv2d) and module.eval_choices
    }
