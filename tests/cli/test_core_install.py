"""The core install (torch, numpy, Pillow only): every command's help works, and a command that needs an
optional package stops with one line naming the extra to install."""

import argparse
import json
import os
import subprocess
import sys

from selecsls.cli import build_parser
from training_fixtures import make_image_folder

OPTIONAL = (
    "tqdm",
    "matplotlib",
    "safetensors",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "openvino",
    "nncf",
    "torch_pruning",
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Runs the CLI as if the optional packages were not installed: importing any of them fails.
CORE_INSTALL = f"""
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def _commands() -> list[str]:
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(subparsers.choices)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, timeout=120, check=False
    )


def test_every_command_help_works_without_optional_packages():
    commands = _commands()
    assert {"train", "eval", "prune", "export", "bench"} <= set(commands)
    code = CORE_INSTALL + (
        "import json\n"
        "from selecsls.cli import main\n"
        "codes = {}\n"
        "for command in sys.argv[1:]:\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        codes[command] = exc.code\n"
        "print(json.dumps(codes))\n"
    )
    done = _python(code, *commands)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == dict.fromkeys(commands, 0)


def test_a_command_needing_an_extra_names_it_in_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    code = CORE_INSTALL + "from selecsls.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    argv = ["train", "--data", str(data), "--output", str(tmp_path / "run"), "--batch-size", "2", "--epochs", "1"]
    done = _python(code, *argv)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("selecsls train: error: ") and "pip install 'selecsls[all]'" in err
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_help_does_not_import_torch():
    code = (
        "import runpy, sys\n"
        "optional = sys.argv[1:]\n"
        "sys.argv = ['selecsls', '--help']\n"
        "try:\n"
        "    runpy.run_module('selecsls', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(sorted(name for name in ('torch', *optional) if name in sys.modules))\n"
    )
    done = _python(code, *OPTIONAL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
