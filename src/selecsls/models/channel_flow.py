"""Where every conv's output channels flow, derived from a spec (no per-block hand wiring).

Because every SelecSLS skip is a concatenation, each input channel of a consumer comes
from exactly one producer channel. Pruning a producer's channel therefore means slicing
the producer's output rows and, in each consumer, the matching input columns at the
producer's offset; no other bookkeeping is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from selecsls.models.spec import CONCAT_CONVS, ModelSpec

__all__ = ["CLASSIFIER", "InputSegment", "Consumer", "channel_flow", "consumers_of"]

#: Name of the classifier as a consumer: it reads the pooled last feature map.
CLASSIFIER = "fc"


@dataclass(frozen=True)
class InputSegment:
    """``producer``'s channels fill the consumer's input channels from ``offset`` on."""

    producer: str
    offset: int


@dataclass(frozen=True)
class Consumer:
    """A layer reading producer channels. ``kernel_size`` 1 for the classifier (it reads pooled values)."""

    name: str
    kernel_size: int
    inputs: tuple[InputSegment, ...]


def channel_flow(spec: ModelSpec, with_classifier: bool = True) -> tuple[Consumer, ...]:
    """Every conv (and the classifier, if any) with the producers it reads, in network order.

    The stem reads the image and has no input segments. Inside a block: conv1 reads the
    block input, conv2..conv5 each read the previous conv, conv6 reads the concatenation
    ``[conv1, conv3, conv5, skip]`` (:data:`~selecsls.models.spec.CONCAT_CONVS`, then the stage
    skip of :meth:`~selecsls.models.spec.ModelSpec.block_sources`).
    """
    widths = {name: cout for name, _, cout, _ in spec.conv_layers()}
    kernels = {name: k for name, _, _, k in spec.conv_layers()}

    def reading(name: str, *producers: str) -> Consumer:
        offset, segments = 0, []
        for producer in producers:
            segments.append(InputSegment(producer, offset))
            offset += widths[producer]
        return Consumer(name, kernels[name], tuple(segments))

    flow = [Consumer("stem", kernels["stem"], ())]
    for i, (source, skip) in enumerate(spec.block_sources()):
        conv = [f"features.{i}.conv{k}" for k in range(1, 7)]
        flow.append(reading(conv[0], source))
        flow.extend(reading(conv[k], conv[k - 1]) for k in range(1, 5))
        concat = [conv[k - 1] for k in CONCAT_CONVS] + ([] if skip is None else [skip])
        flow.append(reading(conv[5], *concat))
    current = f"features.{len(spec.blocks) - 1}.conv6"
    for i in range(len(spec.head)):
        flow.append(reading(f"head.{i}", current))
        current = f"head.{i}"
    if with_classifier:
        flow.append(Consumer(CLASSIFIER, 1, (InputSegment(current, 0),)))
    return tuple(flow)


def consumers_of(flow: tuple[Consumer, ...]) -> dict[str, list[tuple[Consumer, int]]]:
    """Producer name -> [(consumer, input offset)] for every place its channels are read."""
    readers: dict[str, list[tuple[Consumer, int]]] = {
        consumer.name: [] for consumer in flow if consumer.name != CLASSIFIER
    }
    for consumer in flow:
        for segment in consumer.inputs:
            readers[segment.producer].append((consumer, segment.offset))
    return readers
