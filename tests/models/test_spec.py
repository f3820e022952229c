import dataclasses

import pytest

from selecsls.models.spec import VARIANTS, BlockSpec, ModelSpec, SpecError, get_spec


def test_variant_names_and_lookup():
    assert set(VARIANTS) == {"selecsls42", "selecsls42b", "selecsls60", "selecsls60b", "selecsls84", "selecsls102"}
    assert get_spec("SelecSLS60") is VARIANTS["selecsls60"]


def test_unknown_variant_names_choices():
    with pytest.raises(SpecError, match="unknown SelecSLS variant 'resnet9'.*selecsls60b"):
        get_spec("resnet9")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_json_round_trip(name):
    spec = VARIANTS[name]
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_published_block_shape():
    block = get_spec("selecsls60").blocks[1]
    assert block == BlockSpec(64, 64, (64, 64, 32, 64, 32, 128), False)
    assert block.concat_chs == 2 * 64 + 64


def test_non_positive_width_names_layer():
    spec = get_spec("selecsls42b")
    bad = dataclasses.replace(spec.blocks[2], widths=(144, 0, 72, 144, 72, 144))
    with pytest.raises(SpecError, match=r"features\.2\.conv2 has width 0"):
        dataclasses.replace(spec, blocks=(*spec.blocks[:2], bad, *spec.blocks[3:]))


def test_inconsistent_skip_names_block():
    spec = get_spec("selecsls42b")
    bad = dataclasses.replace(spec.blocks[1], skip_chs=32)
    with pytest.raises(SpecError, match=r"features\.1 declares skip_chs=32.*64 channels"):
        dataclasses.replace(spec, blocks=(spec.blocks[0], bad, *spec.blocks[2:]))


def test_inconsistent_input_width_names_block():
    spec = get_spec("selecsls42b")
    bad = dataclasses.replace(spec.blocks[2], in_chs=100)
    with pytest.raises(SpecError, match=r"features\.2 declares in_chs=100 .* outputs 128"):
        dataclasses.replace(spec, blocks=(*spec.blocks[:2], bad, *spec.blocks[3:]))


def test_with_widths_rederives_inputs_and_skips():
    spec = get_spec("selecsls42b").with_widths({"features.0.conv6": 50, "stem": 20, "head.3": 7}, name="p")
    assert spec.stem_chs == 20 and spec.blocks[0].in_chs == 20
    assert spec.blocks[1].in_chs == 50 and spec.blocks[1].skip_chs == 50
    assert spec.num_features == 7 and spec.name == "p"


def test_with_widths_rejects_unknown_layer():
    with pytest.raises(SpecError, match="no conv layer"):
        get_spec("selecsls42b").with_widths({"features.99.conv1": 3})


def test_malformed_dict():
    with pytest.raises(SpecError, match="not a SelecSLS spec"):
        ModelSpec.from_dict({"name": "x"})
