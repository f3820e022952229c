import os
import subprocess
import sys

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


def test_info_names_the_convs_whose_eval_algorithm_is_chosen_and_the_switch(capsys, monkeypatch):
    assert main(["info", "selecsls60"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("eval mode on the CPU without autograd: every conv runs oneDNN's conv on its weight kept ")
    assert "head.0.conv, head.1.conv, head.2.conv, head.3.conv that or an exact im2col matmul, whichever" in last
    assert "SELECSLS_CONV_ALGORITHM=auto (auto, packed, matmul, conv)" in last
    monkeypatch.setattr("selecsls.models.conv.SmallMapConv2d.eval_algorithm", "conv")
    assert main(["info", "selecsls60"]) == 0
    assert "reordering its weight on each call; SELECSLS_CONV_ALGORITHM=conv" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value, status, expected",
    [
        ("conv", 0, "reordering its weight on each call; SELECSLS_CONV_ALGORITHM=conv"),
        ("packed", 0, "every conv runs oneDNN's conv on its weight kept in oneDNN's layout (made on the first"),
        ("gemm", 2, "selecsls info: error: SELECSLS_CONV_ALGORITHM='gemm': expected one of auto, packed, matmul, conv"),
    ],
)
def test_the_environment_variable_sets_the_eval_algorithm(value, status, expected):
    env = os.environ | {"SELECSLS_CONV_ALGORITHM": value}
    done = subprocess.run(
        [sys.executable, "-m", "selecsls", "info", "selecsls42b"], capture_output=True, text=True, env=env
    )
    assert done.returncode == status and expected in (done.stdout + done.stderr)
