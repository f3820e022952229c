"""The conv of every SelecSLS layer: ``nn.Conv2d`` that runs its large convs on tiny maps as one matrix product.

:class:`SmallMapConv2d` (same parameters, same state dict as ``nn.Conv2d``) computes a large conv
whose output has few positions as im2col + one matrix product (:func:`conv2d_as_matmul`), over
only the kernel taps that read real input: the same sums in another order, from the current
weight on every call. Nothing derived from the weights is kept between calls; packing the
weights once for speed is :func:`selecsls.freeze`'s job (an explicit snapshot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["SmallMapConv2d", "conv2d_as_matmul"]


def _live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int]:
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


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) that runs SelecSLS's large convs on tiny maps
    as one matrix product.

    Training at 32-64 px: the head runs convs with up to 1280 channels on 2x2 and 1x1 maps, where
    oneDNN's backward is slow: measured per layer (forward + backward, batch 32), weights of 1M+
    elements ran 1.2-4.3x faster as one matrix product, smaller ones up to 2x slower
    (docs/cifar10.md). So when training, the output map has at most ``gemm_max_output_pixels``
    pixels and the weight at least ``gemm_min_weight_elements`` elements, the conv runs as im2col +
    one matrix product over only the kernel taps that read real input (1 of 9 on a 1x1 map): the
    same sums in another order, and autograd gives the skipped taps exactly zero gradient, as the
    conv does.

    Eval mode on the CPU: PyTorch's eager conv copies the whole weight into oneDNN's blocked layout
    on every call, which for a large weight on a small map costs more than the arithmetic (selecsls42b's
    head.2 at 224, batch 1: 25 ms as the conv, 7 ms as the product). A spatial conv with a weight of
    ``gemm_min_weight_elements`` or more whose output has at most ``gemm_max_eval_positions``
    positions (batch x pixels: the product won below 256 and lost from about 1000 on the
    development EPYC) runs as the product, which reads the weight in place. Every call computes
    from the current weight, as PyTorch promises: edits through ``.data`` or NumPy show in the next
    call. Tracing, ``torch.export`` (ONNX, AOTInductor), ``torch.compile``, dispatch modes (FLOP counting),
    autocast and other devices see the plain conv in eval mode. Both agree within about 1e-6 relative in float32.
    """

    gemm_max_output_pixels = 4
    gemm_max_eval_positions = 256
    gemm_min_weight_elements = 2**20

    def large(self) -> bool:
        """Whether this conv may run as the matrix product (on tiny maps)."""
        large = self.weight.numel() >= self.gemm_min_weight_elements
        return large and self.groups == 1 and self.padding_mode == "zeros"

    def runs_as_product_in_eval(self) -> bool:
        """Whether eval mode may run this conv as the product (on small enough CPU maps): a large spatial
        conv (a 1x1 conv's weight copy is cheap: oneDNN's conv was faster)."""
        return self.large() and self.kernel_size != (1, 1) and not isinstance(self.padding, str)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            taps = self._product_taps(x, self.gemm_max_output_pixels)
            if taps is not None:
                return self._gemm_forward(x, taps[0], taps[1])
            return self._conv_forward(x, self.weight, self.bias)
        return self._eval_forward(x)

    def _product_taps(
        self, x: Tensor, max_output_pixels: int
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        """The live taps (rows, columns) where this conv runs as the product on ``x``: a large conv whose
        output map has at most ``max_output_pixels`` pixels and reads some input (else it is the bias)."""
        if not self.large():
            return None
        rows = _live_taps(x.shape[-2], self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])
        cols = _live_taps(x.shape[-1], self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1])
        if rows[0] > rows[1] or cols[0] > cols[1] or rows[2] * cols[2] > max_output_pixels:
            return None
        return rows, cols

    def _eval_forward(self, x: Tensor) -> Tensor:
        """The eval-mode conv: the product for a large spatial conv on a small map, where nothing
        intercepts the ops (tracing, compiling, FLOP counters and fake tensors see the conv)."""
        if (
            self.runs_as_product_in_eval()
            and x.dim() == 4
            and x.shape[0] > 0  # an empty batch runs as the conv (nothing to multiply)
            and x.device.type == "cpu"
            and type(x) is Tensor  # tensor subclasses (fake, functional) and torch.fx proxies
            and not torch.is_autocast_enabled("cpu")  # the conv's output dtype is autocast's
            and not torch.jit.is_tracing()  # ONNX export, torch.jit.trace: the graph keeps the conv
            and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()
        ):
            taps = self._product_taps(x, self.gemm_max_eval_positions // x.shape[0])
            if taps is not None:
                return self._gemm_forward(x, *taps)
        return self._conv_forward(x, self.weight, self.bias)

    def _gemm_forward(self, x: Tensor, rows: tuple[int, int, int], cols: tuple[int, int, int]) -> Tensor:
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
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``F.conv2d`` (groups 1, zero padding) as im2col + one matrix product (``F.unfold`` + ``matmul``):
    the same sums in another order (about 5e-7 relative in float32)."""
    out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    columns = F.unfold(x, [weight.shape[2], weight.shape[3]], dilation, padding, stride)
    out = torch.matmul(weight.reshape(weight.shape[0], -1), columns)
    out = out.reshape(x.shape[0], weight.shape[0], out_h, out_w)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)
