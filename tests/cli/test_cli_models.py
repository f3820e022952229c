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
