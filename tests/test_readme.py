"""The README's first Python example runs as a new user pastes it (issue 27, item 9).

Decided: the example needs nothing from the clone (the README's commands run from the repository root,
but a pasted Python snippet runs wherever the user is), so it runs in an empty temporary folder, in a
fresh interpreter, offline: every download would go through a proxy that refuses connections, and the
weights cache is an empty folder, so nothing cached earlier can hide a download.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import selecsls

README = Path(__file__).resolve().parents[1] / "README.md"
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    assert match, "the README has no ```python block"
    return match.group(1)


@pytest.mark.slow
def test_the_first_python_block_runs_offline_in_an_empty_folder(tmp_path):
    from training_fixtures import SUBPROCESS_ENV

    folder, cache = tmp_path / "empty", tmp_path / "cache"
    folder.mkdir()
    cache.mkdir()
    (folder / "example.py").write_text(first_python_block(README.read_text()))
    env = {**SUBPROCESS_ENV, **OFFLINE, "SELECSLS_CACHE": str(cache), "TORCH_HOME": str(cache)}
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cache.iterdir()) == []  # nothing was downloaded
    assert (folder / "pruned.safetensors").exists()


def test_a_missing_checkpoint_path_names_the_folder_and_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        selecsls.create_model("selecsls60", checkpoint_path="SelecSLS60_statedict.pth")
    message = str(caught.value)
    assert message.startswith(f"checkpoint_path SelecSLS60_statedict.pth does not exist (looked for in {tmp_path})")
    assert "create_model('selecsls60', pretrained=True) downloads the published ImageNet weights once" in message
    with pytest.raises(FileNotFoundError, match="without checkpoint_path the model gets random weights"):
        selecsls.create_model("selecsls42", checkpoint_path="none.pt")  # no published weights: no pretrained hint
