import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

import selecsls
from selecsls import create_model, fuse
from selecsls.models.card import PAYLOAD_KEY
from selecsls.models.files import HASH_KEY, CheckpointError, identify, to_payload
from sparse_models import relative_error, tiny_spec, trained_like

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def pruned_spec():
    return tiny_spec().with_widths(
        {"stem": 6, "features.1.conv2": 3, "features.4.conv6": 5, "head.3": 7}, name="tiny-pruned"
    )


MODELS = {
    "pruned": lambda: trained_like(create_model(pruned_spec(), num_classes=7, drop_rate=0.1)),
    "fused": lambda: fuse(trained_like(create_model(tiny_spec(), num_classes=5, in_chans=1))),
    "features": lambda: trained_like(
        create_model(tiny_spec(), features_only=True, out_indices=(1, 3, 5), output_stride=16)
    ),
}


def outputs(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out if isinstance(out, list) else [out]


def inputs_for(model):
    return X[:, : model.in_chans]


# Runs in a fresh interpreter: only the file (and selecsls) may be needed to rebuild the model.
FRESH_PROCESS_LOAD = """
import sys, torch, selecsls
torch.set_num_threads(1)  # same reduction order as the test process (conftest), so outputs match bit for bit
for path in sys.argv[1:]:
    model = selecsls.load(path).eval()
    x = torch.load(path + ".input.pt", weights_only=True)
    with torch.no_grad():
        out = model(x)
    torch.save({"outputs": out if isinstance(out, list) else [out], "type": type(model).__name__,
                "spec": model.spec.to_json(), "build_args": repr(model.build_args)}, path + ".result.pt")
"""


def test_round_trip_in_a_fresh_process(tmp_path):
    models = {name: build() for name, build in MODELS.items()}
    paths = []
    for name, model in models.items():
        for suffix in (".pt", ".safetensors"):
            path = tmp_path / f"{name}{suffix}"
            selecsls.save(model, path)
            torch.save(inputs_for(model), f"{path}.input.pt")
            paths.append((model, path))
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, *(str(p) for _, p in paths)], check=True, timeout=120)
    for model, path in paths:
        result = torch.load(f"{path}.result.pt", weights_only=True)
        assert result["type"] == type(model).__name__
        assert result["spec"] == model.spec.to_json()
        assert result["build_args"] == repr(model.build_args)
        for expected, got in zip(outputs(model, inputs_for(model)), result["outputs"], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_torch_file_holds_only_tensors_strings_and_dicts(tmp_path):
    model = MODELS["pruned"]()
    selecsls.save(model, tmp_path / "model.pt")
    stored = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(stored) == {PAYLOAD_KEY, "state_dict", HASH_KEY}
    description = json.loads(stored[PAYLOAD_KEY])
    assert description["spec"] == json.loads(model.spec.to_json())
    assert description["build_args"]["drop_rate"] == 0.1
    assert all(isinstance(t, torch.Tensor) for t in stored["state_dict"].values())


def test_safetensors_file_keeps_the_description_in_its_metadata(tmp_path):
    from safetensors import safe_open

    model = MODELS["fused"]()
    selecsls.save(model, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()[PAYLOAD_KEY])["build_args"]["fused"] is True
        assert set(handle.keys()) == set(model.state_dict())


def test_loaded_model_keeps_preprocessing_and_exports(tmp_path):
    model = MODELS["fused"]()
    preprocessing = replace(model.card.preprocessing, interpolation="bicubic", input_size=(1, 96, 96))
    model.card = replace(model.card, preprocessing=preprocessing)
    selecsls.save(model, tmp_path / "model.pt")
    loaded = selecsls.load(tmp_path / "model.pt").eval()
    assert loaded.pretrained_cfg == model.pretrained_cfg
    x = inputs_for(model)
    with torch.no_grad():
        exported = torch.export.export(loaded, (x,)).module()
        torch.testing.assert_close(exported(x), model.eval()(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_class_names_survive_save_and_load_and_leave_with_a_new_classifier(tmp_path, suffix):
    model = MODELS["pruned"]()
    names = tuple(f"kind {i}" for i in range(7))
    model.card = replace(model.card, label_names=names)
    selecsls.save(model, tmp_path / f"model{suffix}")
    assert selecsls.load(tmp_path / f"model{suffix}").pretrained_cfg["label_names"] == names
    with pytest.warns(UserWarning, match="backbone loaded"):
        finetune = selecsls.load(tmp_path / f"model{suffix}", num_classes=3)
    assert "label_names" not in finetune.pretrained_cfg  # the 7 names belonged to the old classifier
    model.reset_classifier(4)
    assert "label_names" not in model.pretrained_cfg and model.pretrained_cfg["num_classes"] == 4


def test_training_checkpoints_embedding_the_payload_load(tmp_path):
    model = MODELS["pruned"]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    optimizer.step()
    torch.save({**to_payload(model), "optimizer": optimizer.state_dict(), "epoch": 3}, tmp_path / "last.pt")
    loaded = selecsls.load(tmp_path / "last.pt")
    assert loaded.training, "like create_model, load returns a model in training mode"
    torch.testing.assert_close(outputs(loaded, X)[0], outputs(model, X)[0], rtol=0, atol=0)


def test_overrides_change_the_build(tmp_path):
    model = MODELS["pruned"]()
    selecsls.save(model, tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="checkpoint has 7 classifier outputs, the model 3: backbone loaded"):
        finetune = selecsls.load(tmp_path / "model.pt", num_classes=3)
    assert finetune.fc.out_features == 3 and finetune.pretrained_cfg["num_classes"] == 3
    with torch.no_grad():
        torch.testing.assert_close(finetune.eval().forward_features(X), model.eval().forward_features(X))
    features = selecsls.load(tmp_path / "model.pt", features_only=True, out_indices=(5,))
    with torch.no_grad():  # like outputs(): eval without autograd runs the same convs
        torch.testing.assert_close(outputs(features, X)[0], model.forward_features(X))
    folded = selecsls.load(tmp_path / "model.pt", fused=True)
    assert folded.fused and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert relative_error(outputs(model, X)[0], outputs(folded, X)[0]) <= 1e-4


def test_bad_overrides_and_files_are_refused(tmp_path):
    selecsls.save(MODELS["fused"](), tmp_path / "fused.pt")
    with pytest.raises(ValueError, match="BN-fused and cannot be unfused"):
        selecsls.load(tmp_path / "fused.pt", fused=False)
    with pytest.raises(ValueError, match=r"cannot override in_chans when loading a saved model; allowed: num_classes"):
        selecsls.load(tmp_path / "fused.pt", in_chans=3)
    torch.save(create_model(tiny_spec()).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain.pt: its tensor shapes fit no published variant .*--model NAME"):
        selecsls.load(tmp_path / "plain.pt")
    payload = {key: value for key, value in to_payload(MODELS["fused"]()).items() if key != HASH_KEY}
    future = {**payload, PAYLOAD_KEY: json.dumps({**json.loads(payload[PAYLOAD_KEY]), "version": 99})}
    with pytest.raises(CheckpointError, match="version 99 is not 'selecsls.model' version 1"):
        identify(future, "future.pt")
    with pytest.raises(TypeError, match="selecsls.save stores SelecSLS models, got Linear"):
        selecsls.save(nn.Linear(2, 2), tmp_path / "linear.pt")
    assert not (tmp_path / "linear.pt").exists()
