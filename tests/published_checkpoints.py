"""Checkpoints in the published key layouts, built from the layer tables, and an independent forward.

``published_state_dict`` writes what the reference implementation (mehtadushy/SelecSLS-Pytorch)
or timm would save for a spec; ``functional_forward`` computes the network's output from
such a state dict with torch.nn.functional only, so it shares no code with selecsls.models.network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLASSIFIER = {"reference": "classifier.0", "timm": "fc"}


def published_state_dict(spec, layout: str, num_classes: int = 10, seed: int = 0, random: bool = True) -> dict:
    """Trained-looking tensors (or zeros, when only shapes matter) under the reference/timm key names."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return torch.rand(*shape, generator=gen) * (high - low) + low if random else torch.zeros(*shape)

    state = {}
    for layer, cin, cout, k in spec.conv_layers():
        fan_in = cin * k * k
        state[f"{layer}.0.weight"] = (
            torch.randn(cout, cin, k, k, generator=gen) * (2 / fan_in) ** 0.5
            if random
            else torch.zeros(cout, cin, k, k)
        )
        state[f"{layer}.1.weight"] = uniform(cout, low=0.5, high=1.5)
        state[f"{layer}.1.bias"] = uniform(cout, low=-0.2, high=0.2)
        state[f"{layer}.1.running_mean"] = uniform(cout, low=-0.2, high=0.2)
        state[f"{layer}.1.running_var"] = uniform(cout, low=0.5, high=1.5)
        state[f"{layer}.1.num_batches_tracked"] = torch.tensor(1000)
    classifier = CLASSIFIER[layout]
    state[f"{classifier}.weight"] = uniform(num_classes, spec.num_features, low=-1.0, high=1.0) / spec.num_features**0.5
    state[f"{classifier}.bias"] = uniform(num_classes, low=-0.1, high=0.1)
    return state


def functional_forward(state: dict, spec, x: torch.Tensor, layout: str) -> torch.Tensor:
    """Logits of ``spec`` with the weights of ``state`` (reference/timm keys), eval-mode BatchNorm."""

    def conv_bn_relu(x, layer, stride):
        weight = state[f"{layer}.0.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)
        bn = [state[f"{layer}.1.{name}"] for name in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(x, *bn, training=False, eps=1e-5))

    x = conv_bn_relu(x, "stem", 2)
    skip = x
    for i, block in enumerate(spec.blocks):
        d1 = conv_bn_relu(x, f"features.{i}.conv1", 2 if block.first else 1)
        d2 = conv_bn_relu(conv_bn_relu(d1, f"features.{i}.conv2", 1), f"features.{i}.conv3", 1)
        d3 = conv_bn_relu(conv_bn_relu(d2, f"features.{i}.conv4", 1), f"features.{i}.conv5", 1)
        x = conv_bn_relu(torch.cat([d1, d2, d3] if block.first else [d1, d2, d3, skip], 1), f"features.{i}.conv6", 1)
        if block.first:
            skip = x
    for i, conv in enumerate(spec.head):
        x = conv_bn_relu(x, f"head.{i}", conv.stride)
    classifier = CLASSIFIER[layout]
    return F.linear(x.mean((2, 3)), state[f"{classifier}.weight"], state[f"{classifier}.bias"])
