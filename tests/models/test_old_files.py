"""Every model file of release 0.1 still loads, with the same model and outputs.

The files in tests/fixtures/release_0_1 were written by that release's code (README.md there says
how): files of ``selecsls.save`` (torch and safetensors), training checkpoints, reference, timm and
DDP-prefixed state dicts, a BN-fused state dict. ``expected.pt`` holds what loading each gave then.
They carry no content hash: they load unverified, and a run whose last.pt has none resumes.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

import selecsls
from selecsls import ModelSpec, create_model
from selecsls.cli import main
from selecsls.models.files import HASH_KEY, read_model_file
from training_fixtures import make_image_folder, narrow_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "release_0_1"
EXPECTED = torch.load(FIXTURES / "expected.pt", weights_only=True)
SPEC = ModelSpec.from_json(EXPECTED["spec"])

LOADS = {
    "pruned.pt": lambda: selecsls.load(FIXTURES / "pruned.pt"),
    "pruned.safetensors": lambda: selecsls.load(FIXTURES / "pruned.safetensors"),
    "pruned.pt fused=True": lambda: selecsls.load(FIXTURES / "pruned.pt", fused=True),
    "pruned.pt num_classes=3": lambda: selecsls.load(FIXTURES / "pruned.pt", num_classes=3),
    "fused_grey.pt": lambda: selecsls.load(FIXTURES / "fused_grey.pt"),
    "fused_grey.safetensors": lambda: selecsls.load(FIXTURES / "fused_grey.safetensors"),
    "features.pt": lambda: selecsls.load(FIXTURES / "features.pt"),
    "features.safetensors": lambda: selecsls.load(FIXTURES / "features.safetensors"),
    "best.pt": lambda: selecsls.load(FIXTURES / "best.pt"),
    "last.pt": lambda: selecsls.load(FIXTURES / "last.pt"),
    "reference.pth": lambda: create_model(SPEC, num_classes=10, checkpoint_path=FIXTURES / "reference.pth"),
    "timm.pth": lambda: create_model(SPEC, num_classes=10, checkpoint_path=FIXTURES / "timm.pth"),
    "timm.pth fused=True": lambda: create_model(
        SPEC, num_classes=10, fused=True, checkpoint_path=FIXTURES / "timm.pth"
    ),
    "ddp.pth": lambda: selecsls.load(FIXTURES / "ddp.pth", SPEC),
    "fused_state.pth": lambda: selecsls.load(FIXTURES / "fused_state.pth", SPEC, fused=True),
}


def test_every_fixture_is_tested():
    assert LOADS.keys() == EXPECTED["loads"].keys()


@pytest.mark.parametrize("name", sorted(LOADS))
def test_file_of_release_0_1_loads_with_the_same_outputs(name):
    expected = EXPECTED["loads"][name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*checkpoint has 4 classifier outputs, the model 3")  # the override asked
        model = LOADS[name]().eval()
    assert model.spec.to_json() == expected["spec"]
    assert json.dumps(model.build_args, sort_keys=True) == expected["build_args"]
    assert json.dumps(model.pretrained_cfg, sort_keys=True) == expected["pretrained_cfg"]
    with torch.no_grad():
        out = model(EXPECTED["input"][:, : model.in_chans])
    torch.testing.assert_close(out if isinstance(out, list) else [out], expected["outputs"])


@pytest.mark.parametrize("name", sorted({name.split()[0] for name in LOADS}))
def test_file_of_release_0_1_is_unverified_and_info_says_so(name, capsys):
    assert read_model_file(FIXTURES / name).content_hash is None
    assert main(["info", str(FIXTURES / name)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("content: unverified (it carries no content hash")


def test_a_run_saved_without_content_hashes_resumes_and_its_next_saves_carry_one(tmp_path, capsys):
    """Runs in progress saved last.pt before files carried a hash; they must resume as before."""
    data, init, output = make_image_folder(tmp_path / "data", per_class=2), tmp_path / "init.pt", tmp_path / "run"
    selecsls.save(create_model(narrow_spec(), num_classes=3), init)
    train = ["train", "--data", data, "--init", init, "--output", output, "--img-size", 32, "--batch-size", 4]
    train = [*map(str, train), "--workers", "0", "--no-progress", "--epochs", "2"]
    assert main([*train, "--stop-after", "1"]) == 0
    for name in ("last.pt", "best.pt"):
        saved = torch.load(output / name, weights_only=True)
        del saved[HASH_KEY]
        torch.save(saved, output / name)
        assert read_model_file(output / name).content_hash is None
    assert main([*train, "--resume"]) == 0
    assert "epoch 2" in capsys.readouterr().out
    assert read_model_file(output / "last.pt").content_hash is not None
