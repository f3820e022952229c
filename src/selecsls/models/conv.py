"""The conv of every SelecSLS layer: ``nn.Conv2d`` that runs fast in eval mode and on tiny maps.

:class:`SmallMapConv2d` (same parameters, same state dict as ``nn.Conv2d``) runs, in eval on the
CPU, oneDNN's conv with its weight reordered once and kept (PyTorch's eager conv reorders it on
every call), or a large conv as im2col + one matrix product (:func:`conv2d_as_matmul`) where that
is faster; in training, a large conv on 1x1/2x2 maps as the product.
"""

from __future__ import annotations

import os
import weakref
from functools import cache, partial
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from selecsls._timing import fastest_seconds

__all__ = [
    "EVAL_ALGORITHM_ENV",
    "EVAL_ALGORITHMS",
    "SmallMapConv2d",
    "conv2d_as_matmul",
    "eval_conv_choices",
    "packed_weight_bytes",
]


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
EVAL_ALGORITHMS = ("auto", "packed", "matmul", "conv")
#: Timed calls of each algorithm (after one warm-up call) behind an "auto" choice, and how much
#: faster oneDNN's conv must be to be kept where its weight cannot be kept reordered (autograd
#: recording, autocast, not float32): it copies the weight on every call and the product does
#: not. At batch 1 on the development EPYC the product was at most 15% slower on any head conv
#: and up to 4x faster; with 2 threads and another job running, timing noise picked the conv for
#: near-ties at a margin of 1.2. 1x1 convs and the reordered weight copy nothing: the faster wins.
EVAL_CHOICE_REPEATS, EVAL_CONV_MARGIN = 3, 1.5


class _PackedWeight(NamedTuple):
    """A weight in oneDNN's layout for one input shape, and what it was made from: any change of
    the weight through PyTorch (in-place op, ``load_state_dict``, an optimizer step, ``.to``,
    assigning ``.data`` or a new tensor) changes its identity, storage or version counter. The
    source's storage is held, so no new weight can be allocated at its address meanwhile (after a
    round trip such as ``.double().float()`` the allocator would otherwise often reuse it)."""

    source: weakref.ref[Tensor]
    source_data: Tensor
    version: int
    input_shape: Tuple[int, ...]
    weight: Tensor

    def still_fits(self, weight: Tensor, input_shape: Tuple[int, ...]) -> bool:
        return (
            self.source() is weight
            and self.source_data.data_ptr() == weight.data_ptr()
            and self.version == weight._version
            and self.input_shape == input_shape
        )


@cache
def _onednn_kept_weights() -> bool:
    """Whether this torch build has oneDNN's reorder and its conv on a reordered weight (x86 and
    Arm builds with oneDNN do; others take the plain conv)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _eval_algorithm_from_env() -> str:
    value = os.environ.get(EVAL_ALGORITHM_ENV, "auto")
    if value not in EVAL_ALGORITHMS:
        raise ValueError(f"{EVAL_ALGORITHM_ENV}={value!r}: expected one of {', '.join(EVAL_ALGORITHMS)}")
    return value


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) that runs SelecSLS's convs fast.

    Training at 32-64 px: the head runs convs with up to 1280 channels on 2x2 and 1x1 maps, where
    oneDNN's backward is slow: measured per layer (forward + backward, batch 32), weights of 1M+
    elements ran 1.2-4.3x faster as one matrix product, smaller ones up to 2x slower
    (docs/cifar10.md). So when training, the output map has at most ``gemm_max_output_pixels``
    pixels and the weight at least ``gemm_min_weight_elements`` elements, the conv runs as im2col +
    one matrix product over only the kernel taps that read real input (1 of 9 on a 1x1 map): the
    same sums in another order, and autograd gives the skipped taps exactly zero gradient, as the
    conv does.

    Eval mode on the CPU: PyTorch's eager conv copies the whole weight into oneDNN's blocked layout
    on every call (``ONEDNN_VERBOSE=1`` shows the reorder): 25 ms against 6 ms of arithmetic for
    selecsls60's 37.7 MB head.2, and a weight-sized buffer per call. With :attr:`eval_algorithm`
    "auto" (the default), when no gradient is recorded and the input is float32, every conv keeps
    its weight reordered for the last input shape it saw and runs oneDNN's conv on it (its output
    is channels-last). The copy (:class:`_PackedWeight`; :func:`packed_weight_bytes` says how much
    they hold) is rebuilt when the weight changes and dropped by ``train()`` and ``eval()``: call
    ``eval()`` again after editing a weight through ``.data`` or NumPy, which PyTorch does not
    track. A conv with a weight of
    ``gemm_min_weight_elements`` or more times that against the im2col product on its first call
    per input shape, dtype, thread count and mode (one slower first call, as with
    ``torch.backends.cudnn.benchmark``) and keeps the faster (:attr:`eval_choices` records it);
    where the weight cannot stay reordered (autograd recording, autocast, another dtype) it times
    the plain conv against the product and keeps the conv only when ``EVAL_CONV_MARGIN`` times
    faster. "packed" runs every conv on its reordered weight, "matmul" every large one as the
    product, "conv" the plain conv. All agree within about 1e-6 relative in float32.
    TorchScript, tracing (ONNX export), ``torch.compile``, dispatch modes (FLOP counting), other
    devices and other layouts always see the plain conv.
    """

    __constants__ = [*nn.Conv2d.__constants__, "gemm_max_output_pixels", "gemm_min_weight_elements", "eval_algorithm"]
    __jit_ignored_attributes__ = ["eval_choices", "packed"]  # eager-only state; scripted models run the conv
    gemm_max_output_pixels = 4
    gemm_min_weight_elements = 2**20
    #: "auto", "packed", "matmul" or "conv" (see the class docstring); the class attribute sets
    #: every layer, an instance attribute one. Default from the ``SELECSLS_CONV_ALGORITHM`` variable.
    eval_algorithm = _eval_algorithm_from_env()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The "auto" choices made so far: "input shape dtype, threads=N[, mode]" -> "packed",
        #: "matmul" or "conv".
        self.eval_choices: Dict[str, str] = {}
        #: The weight in oneDNN's layout, kept between eval calls (None until the first).
        self.packed: Optional[_PackedWeight] = None

    def train(self, mode: bool = True) -> SmallMapConv2d:
        # Training frees the copy; ``eval()`` starts afresh, which also covers an edit PyTorch
        # cannot see (in place through ``.data`` or a NumPy view).
        self.packed = None
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SmallMapConv2d:
        self.packed = None  # a move or cast makes new weights: free the old copy at once
        return super()._apply(fn, recurse)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "packed": None}  # copies and pickles rebuild it on their first call

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
        """The eval-mode conv as :attr:`eval_algorithm` says, where another algorithm can stand in for it."""
        plain = partial(self._conv_forward, x, self.weight, self.bias)
        if (
            torch.jit.is_tracing()  # ONNX export, torch.jit.trace: the graph keeps the conv
            or torch.compiler.is_compiling()
            or is_in_torch_dispatch_mode()  # FLOP counters, fake tensors: tools that intercept ops
            or type(x) is not Tensor  # tensor subclasses (fake, functional) and torch.fx proxies
            or x.device.type != "cpu"
            or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            or not self.weight.is_contiguous()
            or isinstance(self.padding, str)
            or self.padding_mode != "zeros"
        ):
            return plain()
        packable = self._packable(x)
        packed = partial(self._packed_forward, x)
        if not self.large() or self.eval_algorithm == "packed":
            return packed() if packable else plain()
        matmul = partial(conv2d_as_matmul, x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.eval_algorithm == "matmul":
            return matmul()
        key = f"{'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')}, threads={torch.get_num_threads()}"
        key += "" if packable else (", autocast" if torch.is_autocast_enabled("cpu") else ", unpacked")
        choice = self.eval_choices.get(key)
        # The rival of the product: the reordered conv where it can run (the key says which), else the plain one.
        rival, run_rival = ("packed", packed) if packable else ("conv", plain)
        if choice is None:
            margin = 1.0 if packable or self.kernel_size == (1, 1) else EVAL_CONV_MARGIN
            seconds = fastest_seconds({rival: run_rival, "matmul": matmul}, EVAL_CHOICE_REPEATS)
            choice = rival if margin * seconds[rival] < seconds["matmul"] else "matmul"
            self.eval_choices[key] = choice
            if choice == "matmul":
                self.packed = None  # not needed: free the copy
        return matmul() if choice == "matmul" else run_rival()

    @torch.jit.unused
    def _packable(self, x: Tensor) -> bool:
        """Whether the weight can run reordered: oneDNN's float32 conv, no autograd to record, a
        weight whose changes PyTorch tracks (inference tensors have no version counter)."""
        records_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        return (
            x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.dim() == 4
            and not records_grad
            and not torch.is_autocast_enabled("cpu")
            and not self.weight.is_inference()
            and torch.backends.mkldnn.enabled
            and _onednn_kept_weights()
        )

    @torch.jit.unused
    def _packed_forward(self, x: Tensor) -> Tensor:
        """oneDNN's conv on the weight as reordered for this input shape (reordered again if it changed)."""
        shape = tuple(x.shape)
        packed = self.packed  # one read: another thread may replace it meanwhile
        if packed is None or not packed.still_fits(self.weight, shape):
            packed = self.packed = None  # free the old copy before making the new one
            weight = self.weight.detach()
            reordered = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(shape)
            )
            packed = self.packed = _PackedWeight(weakref.ref(self.weight), weight, weight._version, shape, reordered)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )

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
    """The "auto" choices of ``model``'s large convs so far: conv name -> {input: algorithm}."""
    return {
        name: dict(module.eval_choices)
        for name, module in model.named_modules()
        if isinstance(module, SmallMapConv2d) and module.eval_choices
    }


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of the reordered weights ``model``'s convs keep between eval calls (0 before the first)."""
    return sum(
        module.packed.weight.numel() * module.packed.weight.element_size()
        for module in model.modules()
        if isinstance(module, SmallMapConv2d) and module.packed is not None
    )
