import pytest

from selecsls import get_spec
from selecsls.models.channel_flow import CLASSIFIER, InputSegment, channel_flow, consumers_of


@pytest.mark.parametrize("name", ["selecsls42b", "selecsls60", "selecsls102"])
def test_every_consumer_reads_exactly_its_input_width(name):
    spec = get_spec(name).with_widths({"features.2.conv3": 7, "features.3.conv6": 5, "head.1": 9})
    widths = {layer: cout for layer, _, cout, _ in spec.conv_layers()}
    flow = {c.name: c for c in channel_flow(spec)}
    for layer, cin, _, kernel in spec.conv_layers():
        consumer = flow[layer]
        assert consumer.kernel_size == kernel
        if layer == "stem":
            assert consumer.inputs == ()
            continue
        ends = [s.offset + widths[s.producer] for s in consumer.inputs]
        assert [s.offset for s in consumer.inputs] == [0] + ends[:-1], "segments must tile the input"
        assert ends[-1] == cin
    assert flow[CLASSIFIER].inputs == (InputSegment(f"head.{len(spec.head) - 1}", 0),)


def test_concatenation_and_stage_skip():
    spec = get_spec("selecsls60")  # stage 2 is blocks 2, 3, 4; block 2's output is the skip
    flow = {c.name: c for c in channel_flow(spec)}
    assert [s.producer for s in flow["features.4.conv6"].inputs] == [
        "features.4.conv1",
        "features.4.conv3",
        "features.4.conv5",
        "features.2.conv6",
    ]
    assert [s.producer for s in flow["features.2.conv6"].inputs] == [
        "features.2.conv1",
        "features.2.conv3",
        "features.2.conv5",
    ]
    readers = {p: sorted(c.name for c, _ in r) for p, r in consumers_of(tuple(flow.values())).items()}
    assert readers["features.2.conv6"] == ["features.3.conv1", "features.3.conv6", "features.4.conv6"]
    assert readers["features.3.conv1"] == ["features.3.conv2", "features.3.conv6"]
    assert readers["features.3.conv2"] == ["features.3.conv3"]
    assert readers["features.8.conv6"] == ["head.0"]
    assert readers["head.3"] == [CLASSIFIER]


def test_without_classifier_the_last_layer_has_no_reader():
    flow = channel_flow(get_spec("selecsls42b"), with_classifier=False)
    assert consumers_of(flow)["head.3"] == []
