import argparse
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import selecsls
from published_checkpoints import functional_forward, published_state_dict
from selecsls import create_model, get_spec
from selecsls.models.checkpoint import load_checkpoint
from selecsls.models.files import CheckpointError, read_state_dict
from selecsls.models.layouts import fitting_variants
from sparse_models import relative_error, tiny_spec, trained_like

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


TINY = tiny_spec()


@pytest.mark.parametrize("layout", ["reference", "timm"])
def test_published_layouts_give_the_functional_reference_output(layout, tmp_path):
    spec = get_spec("selecsls42b")
    state = published_state_dict(spec, layout)
    torch.save(state, tmp_path / "selecsls42b.pth")
    model = create_model("selecsls42b", num_classes=10, checkpoint_path=tmp_path / "selecsls42b.pth").eval()
    with torch.no_grad():
        reference = functional_forward(state, spec, X, layout)
        output = model(X)
    assert reference.abs().max() > 1e-3, "degenerate reference output"
    assert relative_error(reference, output) <= 1e-4


@pytest.fixture(scope="module", params=["reference", "timm"])
def published(request, tmp_path_factory):
    """(layout, state dict, file) of a trained-looking tiny model in a published layout."""
    state = published_state_dict(TINY, request.param)
    path = tmp_path_factory.mktemp(request.param) / "tiny.pth"
    torch.save(state, path)
    return request.param, state, path


def wrapped_forms(state):
    ddp = {f"module.{k}": v for k, v in state.items()}
    return {
        "state_dict": {"state_dict": state, "epoch": 3, "arch": "selecsls42b"},
        "model": {"model": ddp},
        "state_dict_ema": {"state_dict_ema": state, "optimizer": {"lr": 0.1}},
        "compiled_ddp": {f"module._orig_mod.{k}": v for k, v in state.items()},
    }


@pytest.mark.parametrize("form", ["state_dict", "model", "state_dict_ema", "compiled_ddp"])
def test_wrappers_and_prefixes_are_removed(published, form, tmp_path):
    _, state, path = published
    wrapped = tmp_path / f"{form}.pth"
    torch.save(wrapped_forms(state)[form], wrapped)
    unwrapped, direct = read_state_dict(wrapped), read_state_dict(path)
    assert unwrapped.keys() == direct.keys()
    assert all(torch.equal(unwrapped[key], tensor) for key, tensor in direct.items())


def test_safetensors_checkpoint(published, tmp_path):
    layout, state, _ = published
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    model = create_model(TINY, num_classes=10, checkpoint_path=path).eval()
    with torch.no_grad():
        assert relative_error(functional_forward(state, TINY, X, layout), model(X)) <= 1e-4


class _TouchOnLoad:
    """Unpickling this runs Path.touch: the kind of code a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"stem.0.weight": torch.zeros(1)}, "payload": _TouchOnLoad(marker)}, path)
    with pytest.raises(
        CheckpointError, match=r"evil.pth stores pickled Python objects \(getattr\), which selecsls refuses"
    ):
        selecsls.load(path)
    assert not marker.exists()


def test_file_problems_have_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(
        CheckpointError, match=r"garbage.pth is not a readable PyTorch checkpoint \(Unsupported operand"
    ):
        read_state_dict(garbage)
    (tmp_path / "empty.pth").touch()
    with pytest.raises(CheckpointError, match="empty.pth is empty or truncated"):
        read_state_dict(tmp_path / "empty.pth")
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_state_dict(bad_safetensors)
    no_weights = tmp_path / "args.pth"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, no_weights)
    with pytest.raises(CheckpointError, match=r"no state dict found .*top-level keys are \[config, epoch\]"):
        read_state_dict(no_weights)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        read_state_dict(tensor_only)


def test_mismatch_lists_keys_and_names_the_variant_that_fits():
    state = published_state_dict(get_spec("selecsls42b"), "timm", num_classes=1000, random=False)
    model = create_model("selecsls60")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, state)
    message = str(info.value)
    assert message.startswith("state dict does not fit selecsls60 (")
    assert re.search(r"\d+ missing: features\.6\.conv1\.conv\.weight, [\w.]+, [\w.]+ \(\+\d+ more\)", message)
    assert (
        "with wrong shape: features.2.conv1.conv.weight checkpoint (144, 128, 3, 3) vs model (128, 128, 3, 3)"
        in message
    )
    assert "its shapes fit selecsls42b: build that variant (create_model('selecsls42b', ...))" in message
    assert "\n" not in message
    extra = {**state, "aux_head.weight": torch.zeros(1)}
    with pytest.raises(
        CheckpointError, match=r"\(1 unexpected: aux_head\.weight\); its conv shapes fit selecsls42b: only"
    ):
        load_checkpoint(create_model("selecsls42b"), extra)


def test_mismatch_with_no_fitting_variant_points_to_selecsls_load():
    state = trained_like(create_model(TINY)).state_dict()
    pruned = create_model(TINY.with_widths({"features.0.conv2": 2}))
    with pytest.raises(CheckpointError, match=r"no published variant fits its shapes.*selecsls\.load\(path\)"):
        load_checkpoint(pruned, state)


def test_strict_false_loads_what_fits_and_reports_the_rest():
    source = trained_like(create_model(TINY, num_classes=10))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.3.")}
    state["extra.weight"] = torch.zeros(1)
    state["features.0.conv1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    model = create_model(TINY, num_classes=10)
    result = load_checkpoint(model, state, strict=False)
    assert "head.3.conv.weight" in result.missing_keys
    assert set(result.unexpected_keys) == {"extra.weight", "features.0.conv1.conv.weight"}
    torch.testing.assert_close(model.head[0].conv.weight, source.head[0].conv.weight)


def test_other_num_classes_keeps_backbone_and_warns(published):
    _, state, path = published
    with pytest.warns(
        UserWarning, match=r"checkpoint has 10 classifier outputs, the model 3: backbone loaded, classifier freshly"
    ):
        model = create_model(TINY, num_classes=3, checkpoint_path=path)
    reference = create_model(TINY, num_classes=10, checkpoint_path=path)
    torch.testing.assert_close(model.head[3].conv.weight, reference.head[3].conv.weight)
    assert model.fc.weight.shape == (3, TINY.num_features)


def test_models_without_classifier_ignore_it_silently(published):
    _, _, path = published
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = create_model(TINY, features_only=True, checkpoint_path=path).eval()
        pooled = create_model(TINY, num_classes=0, checkpoint_path=path).eval()
    reference = create_model(TINY, num_classes=10, checkpoint_path=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(features(X)[-1], reference.forward_features(X))
        torch.testing.assert_close(pooled(X), reference.forward_head(reference.forward_features(X), pre_logits=True))


@pytest.mark.parametrize("in_chans", [1, 6])
def test_stem_adapts_to_other_input_channels(published, in_chans):
    _, _, path = published
    with pytest.warns(UserWarning, match=f"checkpoint stem reads 3 input channels, the model {in_chans}"):
        model = create_model(TINY, num_classes=10, in_chans=in_chans, checkpoint_path=path).eval()
    rgb = create_model(TINY, num_classes=10, checkpoint_path=path).eval()
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        # A grey image gives the pretrained response, whatever the number of channels it is spread over.
        assert relative_error(rgb(grey.expand(-1, 3, -1, -1)), model(grey.expand(-1, in_chans, -1, -1))) <= 1e-4


def test_fused_checkpoints_need_a_fused_model_and_say_so(tmp_path):
    path = tmp_path / "fused.pth"
    fused = selecsls.fuse(trained_like(create_model(TINY, num_classes=10)))
    torch.save(fused.state_dict(), path)
    with pytest.raises(CheckpointError, match="the checkpoint is BN-fused: build with fused=True"):
        create_model(TINY, num_classes=10, fused=False, checkpoint_path=path)
    for chosen in (dict(fused=True), {}):  # left unset, the file's fusion is taken
        model = create_model(TINY, num_classes=10, checkpoint_path=path, **chosen).eval()
        assert model.fused
        with torch.no_grad():
            torch.testing.assert_close(model(X), fused.eval()(X))


def test_fused_true_folds_an_unfused_checkpoint_after_loading(published):
    _, _, path = published
    model = create_model(TINY, num_classes=10, fused=True, checkpoint_path=path).eval()
    reference = create_model(TINY, num_classes=10, checkpoint_path=path).eval()
    assert model.fused
    with torch.no_grad():
        assert relative_error(reference(X), model(X)) <= 1e-4


def test_fitting_variants_tells_every_published_variant_apart():
    for name, spec in selecsls.models.spec.VARIANTS.items():
        state = published_state_dict(spec, "timm", random=False)
        assert fitting_variants(read_state_dict(state)) == [name]


def test_load_model_detects_variant_classes_and_channels(tmp_path):
    state = published_state_dict(get_spec("selecsls42b"), "reference", random=False)
    grey = tmp_path / "grey.pth"
    torch.save({**state, "stem.0.weight": state["stem.0.weight"].sum(1, keepdim=True)}, grey)
    model = selecsls.load(grey)
    assert (model.spec.name, model.num_classes, model.in_chans) == ("selecsls42b", 10, 1)
    assert selecsls.load(grey, num_classes=0).num_classes == 0


def test_load_model_rebuilds_saved_models_and_uses_name_for_plain_state_dicts(tmp_path):
    pruned = trained_like(create_model(tiny_spec(), num_classes=4)).eval()
    saved = tmp_path / "pruned.pt"
    selecsls.save(pruned, saved)
    assert selecsls.load(saved).spec == pruned.spec
    plain = tmp_path / "plain.pth"
    torch.save(pruned.state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"plain.pth: its tensor shapes fit no published variant .*--model NAME"):
        selecsls.load(plain)
    with pytest.raises(CheckpointError, match="plain.pth does not fit selecsls42b"):
        selecsls.load(plain, "selecsls42b")


def test_pickled_training_arguments_are_refused_with_the_fix(tmp_path):
    """Old training scripts pickled argparse.Namespace next to the weights."""
    path = tmp_path / "old.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(
        CheckpointError, match=r"old.pth stores pickled Python objects \(argparse.Namespace\).*re-save only its tensors"
    ):
        read_state_dict(path)
