import importlib.util
from pathlib import Path

import torch

from published_checkpoints import published_state_dict
from selecsls import count_params, create_model, get_spec, list_models

REPO = Path(__file__).resolve().parents[2]


def test_hubconf_has_one_entry_point_per_model():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = sorted(name for name in dir(hubconf) if not name.startswith("_") and callable(getattr(hubconf, name)))
    assert public == list_models()
    assert hubconf.dependencies == ["torch"]
    assert "selecsls.create_model" in hubconf.selecsls60.__doc__


def test_torch_hub_load_from_a_local_clone():
    model = torch.hub.load(str(REPO), "selecsls42b", source="local", num_classes=10)
    assert count_params(model) == count_params(create_model("selecsls42b", num_classes=10))


def test_torch_hub_load_passes_checkpoint_path(tmp_path):
    state = published_state_dict(get_spec("selecsls42b"), "reference", num_classes=3)
    torch.save(state, tmp_path / "weights.pth")
    model = torch.hub.load(
        str(REPO), "selecsls42b", source="local", num_classes=3, checkpoint_path=tmp_path / "weights.pth"
    )
    torch.testing.assert_close(model.fc.weight, state["classifier.0.weight"], rtol=0, atol=0)
