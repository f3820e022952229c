import pytest

import selecsls
from selecsls import count_macs, count_params, create_model
from selecsls.cli import main
from selecsls.models.weights import get_weights


@pytest.fixture
def two_models(monkeypatch):
    """One variant with published weights, one without (the full table builds all six: too slow here)."""
    monkeypatch.setattr(selecsls, "list_models", lambda: ["selecsls42", "selecsls42b"])


def test_models_table_counts_params_and_macs_and_reads_top1_from_the_registry(two_models, capsys):
    assert main(["models", "--img-size", "32"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["model", "params", "GMACs@32", "top-1", "top-5", "pretrained", "weights"]
    table = {row.split()[0]: row.split()[1:] for row in rows}
    assert table.keys() == {"selecsls42", "selecsls42b"}
    for name, (params, gmacs, *_) in table.items():
        model = create_model(name)
        assert int(params.replace(",", "")) == count_params(model)
        assert gmacs == f"{count_macs(model, (1, 3, 32, 32)) / 1e9:.2f}"
    weights = get_weights("selecsls42b")
    assert table["selecsls42b"][2:] == [f"{weights.top1:.2f}", f"{weights.top5:.2f}", "selecsls42b.in1k"]
    assert table["selecsls42"][2:] == ["-", "-", "-"]


def test_info_names_the_convs_that_run_as_the_matmul_in_eval(capsys):
    assert main(["info", "selecsls60"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("eval mode on the CPU: head.0.conv, head.1.conv, head.2.conv run as an exact im2col matmul")
    assert "nothing is kept between calls (selecsls.freeze packs the weights once)" in last


def test_info_checks_a_file_as_eval_does(tmp_path, capsys):
    # A card for resnet50 beside one unrelated tensor: info said "resnet50, 1000 classes" and exited 0; eval refuses it.
    import torch

    from selecsls.models.files import HASH_KEY, to_payload

    payload = to_payload(create_model("resnet50", num_classes=3))
    del payload[HASH_KEY]
    torch.save({**payload, "state_dict": {"unrelated": torch.zeros(3)}}, tmp_path / "card.pt")
    assert main(["info", str(tmp_path / "card.pt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "card.pt does not fit the resnet50 baseline" in err
    selecsls.save(create_model("resnet50", num_classes=3), tmp_path / "good.pt")
    assert main(["info", str(tmp_path / "good.pt")]) == 0
    assert "resnet50, 3 classes" in capsys.readouterr().out
