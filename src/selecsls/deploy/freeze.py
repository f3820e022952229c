"""``selecsls.freeze``: an inference-only snapshot of a network, fast on the CPU, one copy of its weights.

PyTorch's eager conv copies its weight into oneDNN's blocked layout on every call (selecsls60's
head: 25 ms of copying against 6 ms of arithmetic). :func:`freeze` does that copy once: it
traces the network (``torch.fx``), folds each BatchNorm into its conv and fuses its ReLU; on the
first call each conv packs its weight into oneDNN's layout for that input shape
(``mkldnn_reorder_conv2d_weight``), releases the dense copy and from then on runs oneDNN's conv on
it (``mkldnn._convolution_pointwise``). The result is a snapshot, as ``torch.jit.freeze`` and
inductor freezing are: later edits of the original model do not reach it, it holds no Parameters
and refuses ``train()``. Against inductor freezing (docs/benchmarks.md): as fast for SelecSLS, well
under a second to freeze and pack instead of 20-35 s of compilation per input shape, any image size.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import threading
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from selecsls.models.card import ModelCard
from selecsls.models.fusion import fold_bn

__all__ = ["FrozenModel", "PackedConv2d", "freeze", "onednn_packing"]

#: The ReLU forms a traced network may apply to a conv's output (module, function, method).
_RELU_TARGETS = (F.relu, torch.relu, torch.relu_, "relu", "relu_")


@cache
def onednn_packing() -> bool:
    """Whether this torch build has oneDNN's weight reorder and its conv on a reordered weight (x86 and
    Arm builds with oneDNN do; others run the BN-folded weight with the plain conv)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere): it hands the heap's free pages back to the system."""
    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None


class PackedConv2d(nn.Module):
    """One conv (BatchNorm folded in, its ReLU fused when ``relu``) holding one copy of its weight: the
    folded dense weight until its first call, which packs it into oneDNN's layout for that call's
    input shape and releases the dense one. Other input shapes run too (oneDNN re-lays the weight
    out per call only where a shape needs another layout). Without oneDNN: the dense weight and
    ``F.conv2d``."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.relu = relu
        weight, bias = (conv.weight, conv.bias) if bn is None else fold_bn(conv, bn)
        # Private float32 copies in plain attributes, not Parameters or buffers: a snapshot has nothing to
        # train, save or move, and no edit of the original reaches it.
        weight = weight.detach().float().contiguous()
        self.weight = weight.clone() if bn is None else weight
        self.bias = None if bias is None else bias.detach().float().clone()
        self.packed = False
        self._packing = threading.Lock()

    def _pack(self, input_size: list[int]) -> None:
        plain = self.weight.to_mkldnn()
        self.weight = plain  # the dense copy is freed before the packed one is made (at most two exist)
        self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            plain, list(self.padding), list(self.stride), list(self.dilation), self.groups, input_size
        )
        self.packed = True
        del plain
        # glibc keeps the freed copies on its heap unless asked, so packing conv after conv would peak
        # at two copies of the weights (selecsls60 at 224: 240 instead of 174 MiB above the bare import).
        if _malloc_trim() is not None:
            _malloc_trim()(0)

    def forward(self, x: Tensor) -> Tensor:
        if not onednn_packing():
            out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            return F.relu(out) if self.relu else out
        if not self.packed:
            with self._packing:  # threads sharing the model pack once
                if not self.packed:
                    self._pack(list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if self.relu else "none", [], "",
        )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        """Copied and pickled as the folded dense weight (oneDNN's packed tensor is process-local data
        without storage); the copy packs again on its first call."""
        state = self.__dict__.copy()
        del state["_packing"]
        if self.packed:
            state["weight"], state["packed"] = self.weight.to_dense(), False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._packing = threading.Lock()

    def extra_repr(self) -> str:
        layout = "oneDNN-packed" if self.packed else "dense"
        return f"{tuple(self.weight.shape)} {layout}, stride={self.stride}, padding={self.padding}, relu={self.relu}"


class FrozenModel(nn.Module):
    """What :func:`freeze` returns: ``forward`` runs the snapshot without autograd; ``card`` (and
    ``pretrained_cfg``) are the original's. Float32 on the CPU only."""

    def __init__(self, network: torch.fx.GraphModule, source: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.source_type = type(source).__name__
        card = getattr(source, "card", None)
        self.card: ModelCard | None = card if isinstance(card, ModelCard) else None
        for name in ("num_classes", "num_features", "feature_info"):
            if hasattr(source, name):
                setattr(self, name, copy.copy(getattr(source, name)))
        super().train(False)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The card's timm view, as the original model gives it."""
        if self.card is None:
            raise AttributeError(f"this frozen {self.source_type} has no model card")
        return self.card.pretrained_cfg()

    def train(self, mode: bool = True) -> FrozenModel:
        if mode:
            raise RuntimeError(
                "a frozen model is an inference-only snapshot (BatchNorm folded, weights packed, nothing to train): "
                "train the original model and call selecsls.freeze on it again"
            )
        return super().train(False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FrozenModel:
        raise RuntimeError(
            "a frozen model is a float32 CPU snapshot and cannot be moved or cast: run it on the CPU in float32 "
            "(on a GPU, run the original model, e.g. with the cuda_graphs backend)"
        )

    def forward(self, x: Tensor) -> Any:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            raise ValueError(
                f"a frozen model takes a float32 CPU batch (N, C, H, W); got {x.dtype} of shape "
                f"{tuple(x.shape)} on {x.device.type}: convert the input with .float().cpu()"
            )
        with torch.no_grad():
            return self.network(x)


class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every conv (``SmallMapConv2d`` included) as one node, so it can be replaced whole."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(node: torch.fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    return node.op in ("call_function", "call_method") and node.target in _RELU_TARGETS


def _is_eval_bn(node: torch.fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    if node is None or node.op != "call_module":
        return False
    module = modules[node.target]
    return type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_mean is not None


def _packable(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _snapshot_module(module: nn.Module, consume: bool) -> nn.Module:
    """A module outside any conv (classifier, pooling, ...) whose Parameters became buffers: a copy,
    or ``module`` itself when consuming."""
    copied = module if consume else copy.deepcopy(module)
    for owner in copied.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            del owner._parameters[name]
            owner.register_buffer(name, parameter.detach())
    return copied


def _release_tensors(module: nn.Module) -> None:
    """Drop a consumed module's own Parameters and buffers (the snapshot holds what it needs of them)."""
    for tensors in (module._parameters, module._buffers):
        for name in tensors:
            tensors[name] = None


def _consumed(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "this model was consumed by selecsls.freeze(model, consume=True), which released its weights: "
        "use the frozen model, or load the original again"
    )


def _frozen_graph(model: nn.Module, consume: bool) -> torch.fx.GraphModule:
    """``model`` traced in eval mode, every conv (+ BatchNorm, + ReLU) replaced by a :class:`PackedConv2d`;
    when consuming, each conv's and BatchNorm's tensors released once their last call is folded."""
    tracer = _ConvLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx refuses data-dependent control flow in many distinct ways
        raise TypeError(
            f"freeze traces the network with torch.fx, which failed on {type(model).__name__}: {exc}"
        ) from exc
    finally:
        # torch.fx leaves the tracer in a reference cycle (a self-recursive closure of ``trace``) that holds
        # the model and its tensors: without this the original outlives ``del`` until the cyclic garbage
        # collector happens to run (selecsls60: 270 instead of 153 MiB resident after three calls).
        vars(tracer).clear()
    for node in graph.nodes:
        if isinstance(node.type, str):  # a postponed annotation ("Tensor"): fx could not pickle the code
            node.type = None
        if node.op == "get_attr":
            raise TypeError(
                f"freeze: {type(model).__name__} reads the tensor {node.target} outside its modules; "
                "freeze supports networks built from conv, BatchNorm, linear and parameter-free layers"
            )
    modules = dict(model.named_modules())
    calls_left = Counter(node.target for node in graph.nodes if node.op == "call_module")
    new_modules: dict[str, nn.Module] = {}
    snapshots: dict[str, str] = {}  # a module outside the convs, called more than once, is copied once
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, nn.Conv2d) and _packable(module):
            last, bn, folded = node, None, [node.target]
            if _is_eval_bn(_only_user(node), modules):
                last = _only_user(node)
                bn = modules[last.target]
                folded.append(last.target)
            relu = _is_relu(_only_user(last), modules)
            if relu:
                last = _only_user(last)
            name = node.name  # one per call: a conv called twice may be followed by other BatchNorms
            new_modules[name] = PackedConv2d(module, bn, relu)
            for target in folded if consume else ():
                calls_left[target] -= 1
                if not calls_left[target]:
                    _release_tensors(modules[target])
            with graph.inserting_before(node):
                packed = graph.call_module(name, (node.args[0],))
            last.replace_all_uses_with(packed)
            while last is not node:  # the ReLU and BatchNorm nodes, then the conv itself
                previous = last.args[0]
                graph.erase_node(last)
                last = previous
            graph.erase_node(node)
        else:
            if node.target not in snapshots:
                name = snapshots[node.target] = node.target.replace(".", "_")
                has_tensors = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
                new_modules[name] = _snapshot_module(module, consume) if has_tensors else module
            node.target = snapshots[node.target]
    frozen = torch.fx.GraphModule(new_modules, graph, class_name=f"Frozen{type(model).__name__}")
    frozen.graph.eliminate_dead_code()
    frozen.recompile()
    return frozen


@torch.no_grad()
def freeze(model: nn.Module, consume: bool = False) -> FrozenModel:
    """An inference-only snapshot of ``model`` (any SelecSLS network: dense, pruned, fused,
    ``features_only``; the baselines): BatchNorm folded, ReLU fused, each conv's weight packed into
    oneDNN's layout on the first call (for its input shape) and the dense copy released: one copy
    of the weights. Outputs equal the eval-mode model's (about 1e-6 relative in float32) at any
    batch and image size. ``model`` is left unchanged (its mode included); later edits of it do
    not reach the snapshot: freeze it again.

    ``consume``: release the original's tensors as they are folded, for a model nothing else will
    use (just loaded from a file): freezing then holds one copy of the weights plus one conv's, not
    two copies. The original is left without them; calling it raises.
    """
    if isinstance(model, FrozenModel):
        return model  # already a snapshot
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if devices - {"cpu"}:
        raise ValueError("freeze packs weights for the CPU: call model.cpu() first (on a GPU, use cuda_graphs)")
    if dtypes - {torch.float32}:
        raise ValueError("freeze packs float32 weights: call model.float() first")
    modes = {module: module.training for module in model.modules()}
    model.eval()  # trace the eval-mode forward (BatchNorm on running statistics, eval-only branches)
    try:
        network = _frozen_graph(model, consume)
    finally:
        for module, training in modes.items():
            module.training = training
    if consume:
        model.forward = _consumed
    return FrozenModel(network, model)
