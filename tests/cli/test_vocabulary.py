"""One vocabulary across commands (issue 27, item 10): where a command writes is ``--output`` (a folder for
train, a file for prune and export, a prefix for bench); ``--out``, the old spelling, still works."""

import json
import subprocess
from pathlib import Path

import pytest

import selecsls
from selecsls.cli import build_parser, main
from sparse_models import sparse_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _options(command: str) -> dict[str, list[str]]:
    """dest -> option strings of one subcommand."""
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return {action.dest: action.option_strings for action in parser._actions}


@pytest.mark.parametrize("command", ["train", "prune", "export", "bench"])
def test_every_command_that_writes_takes_output(command):
    spellings = {tuple(strings) for strings in _options(command).values()}
    assert any("--output" in strings for strings in spellings), spellings


@pytest.mark.parametrize("command", ["prune", "export"])
def test_the_old_out_spelling_is_an_alias_of_output(command):
    [strings] = [strings for strings in _options(command).values() if "--output" in strings]
    assert strings == ["--output", "--out"]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.pt"
    selecsls.save(sparse_tiny_model(0.3), path)
    return path


@pytest.mark.parametrize("spelling", ["--output", "--out"])
def test_prune_writes_where_either_spelling_says(model_file, tmp_path, spelling, capsys):
    target = tmp_path / f"pruned{spelling}.pt"
    assert main(["prune", str(model_file), spelling, str(target), "--img-size", "32", "--repeats", "1"]) == 0
    assert selecsls.load(target).spec is not None


def test_export_takes_output(model_file, tmp_path, capsys):
    target = tmp_path / "tiny.onnx"
    assert main(["export", str(model_file), "--format", "onnx", "--output", str(target)]) == 0
    assert target.exists()


def test_info_prints_the_parameter_count(model_file, capsys):
    assert main(["info", str(model_file)]) == 0
    expected = f"{selecsls.count_params(selecsls.load(model_file)):,} parameters"
    assert expected in capsys.readouterr().out.splitlines()[0]
    assert main(["info", str(model_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == selecsls.count_params(selecsls.load(model_file))


@pytest.mark.parametrize("name", ["bench.json", "bench.png"])
def test_the_bench_outputs_in_the_repository_root_are_ignored_by_git(name):
    done = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT, capture_output=True)
    if done.returncode == 128:
        pytest.skip(f"not a git checkout: {done.stderr.decode().strip()}")
    assert done.returncode == 0, f"{name} in the repository root is not ignored by .gitignore"
