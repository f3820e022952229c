"""The output-safety rule: no output overwrites an input, output locations are checked before any work,
a failed write (a full disk included) keeps the previous file and leaves no temporary file, and files
get the mode the umask asks for."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

import selecsls
from selecsls import OutputError, atomic_write, check_output
from selecsls.cli import main
from selecsls.deploy.export import export_model
from sparse_models import sparse_tiny_model
from training_fixtures import make_image_folder, narrow_spec

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "x.pt"
    selecsls.save(sparse_tiny_model(), path)
    return path


def _mounted(tmp_path, options):
    """A tmpfs mounted with ``options`` (needs root; the test is skipped where mounting is not allowed)."""
    folder = tmp_path / "mount"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small filesystem here (needs root)")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB filesystem holding one small good file, ``previous.bin``."""
    folder = _mounted(tmp_path, "size=64k")
    (folder / "previous.bin").write_bytes(b"good")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_disk(tmp_path):
    folder = _mounted(tmp_path, "size=64k,ro")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def _only_previous_file(folder: Path):
    assert sorted(p.name for p in folder.iterdir()) == ["previous.bin"]
    assert (folder / "previous.bin").read_bytes() == b"good"


# ------------------------------------------------------------------------- inputs are never outputs
@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink"])
def test_an_output_that_resolves_to_an_input_is_refused(model_file, tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(model_file.parent)
    out = {
        "same": model_file,
        "relative": Path("..") / model_file.parent.name / model_file.name,
        "symlink": tmp_path / "link.pt",
        "hardlink": tmp_path / "hard.pt",
    }[spelling]
    if spelling == "symlink":
        out.symlink_to(model_file)
    elif spelling == "hardlink":
        os.link(model_file, out)
    with pytest.raises(OutputError, match="is the input"):
        check_output(out, [model_file])


@pytest.mark.parametrize("command", ["export", "prune"])
def test_export_and_prune_never_overwrite_their_input(model_file, capsys, command):
    before = model_file.read_bytes()
    options = ["--format", "onnx"] if command == "export" else ["--img-size", "32", "--repeats", "1"]
    assert main([command, str(model_file), "--out", str(model_file), *options]) == 2
    err = capsys.readouterr().err
    assert "is the input" in err and len(err.strip().splitlines()) == 1
    assert model_file.read_bytes() == before


# -------------------------------------------------------------------- checked before any work
def test_unwritable_places_are_refused_up_front(model_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(blocker / "sub" / "out.pt")
    with pytest.raises(OutputError, match="is a directory"):
        check_output(tmp_path)
    with pytest.raises(OutputError, match="is an existing file"):
        check_output(blocker, directory=True)
    assert check_output(tmp_path / "new" / "dir", directory=True) == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists(), "checking must not create anything"


def test_a_read_only_place_is_refused_before_any_work(read_only_disk, model_file, capsys, monkeypatch):
    import selecsls.bench.runner as runner

    monkeypatch.setattr(runner, "run_benchmark", lambda *a, **k: pytest.fail("benchmarked before checking"))
    assert main(["bench", "--output", str(read_only_disk / "bench")]) == 2
    assert "is not writable" in capsys.readouterr().err
    with pytest.raises(OutputError, match="is not writable"):
        export_model(sparse_tiny_model(), read_only_disk / "m.onnx", "onnx")


# --------------------------------------------------------------------------- failed writes
def test_a_full_disk_keeps_the_previous_file_and_no_temporary_file(small_disk):
    model = sparse_tiny_model()
    for name in ("model.pt", "model.safetensors"):
        with pytest.raises(OutputError, match=f"cannot write {small_disk / name}: .*nothing was written"):
            selecsls.save(model, small_disk / name)
        _only_previous_file(small_disk)
    with pytest.raises(OutputError, match="No space left on device"), atomic_write(small_disk / "previous.bin") as f:
        f.write(b"x" * 200_000)
    _only_previous_file(small_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        export_model(model.eval(), small_disk / "m.onnx", "onnx")
    _only_previous_file(small_disk)


def test_a_full_disk_during_aoti_export_keeps_the_previous_file(small_disk, monkeypatch):
    """The package is compiled in memory and written by Python: a full disk is an error, not an abort."""
    from selecsls.deploy import aoti

    monkeypatch.setattr(aoti, "compile_package", lambda *args: b"x" * 2_000_000)  # a package's size, no compile
    with pytest.raises(OutputError, match="No space left on device"):
        export_model(sparse_tiny_model().eval(), small_disk / "m.pt2", "aoti")
    _only_previous_file(small_disk)


def test_a_full_disk_during_torch_save_is_reported_as_such(small_disk):
    """torch.save swallows the write's OSError and raises "[enforce fail at inline_container.cc] unexpected pos"."""
    with pytest.raises(OutputError, match="No space left on device"), atomic_write(small_disk / "previous.bin") as f:
        torch.save({"weights": torch.zeros(100_000)}, f)
    _only_previous_file(small_disk)


def test_a_full_disk_during_a_training_save_keeps_the_earlier_run(small_disk, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4)
    (small_disk / "previous.bin").rename(small_disk / "last.pt")  # an earlier run's save, replaced by --overwrite
    command = ["train", "--data", str(data), "--output", str(small_disk), "--init", str(_narrow_model(tmp_path))]
    options = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1", "--no-progress"]
    assert main([*command, *options, "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"selecsls train: error: cannot write {small_disk / 'best.pt'}: No space left on device (nothing was written)"
    )
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt"]  # the lock goes with the run
    assert (small_disk / "last.pt").read_bytes() == b"good"


def _narrow_model(folder: Path) -> Path:
    path = folder / "narrow.pt"
    selecsls.save(selecsls.create_model(narrow_spec(), num_classes=3), path)
    return path


# ------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        selecsls.save(sparse_tiny_model(), tmp_path / "m.pt")
        with atomic_write(tmp_path / "t.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == mode


def test_replacing_a_file_keeps_its_mode(tmp_path):
    target = tmp_path / "m.pt"
    torch.save({}, target)
    target.chmod(0o640)
    selecsls.save(sparse_tiny_model(), target)
    assert target.stat().st_mode & 0o777 == 0o640
