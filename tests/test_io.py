from pathlib import Path

import pytest

from selecsls._io import atomic_path, atomic_paths, atomic_write, printable


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target], "no temporary file may be left behind"
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_path_creates_parent(tmp_path):
    target = tmp_path / "a" / "b.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
        assert not target.exists()
    assert target.read_text() == "x"


def test_atomic_paths_write_all_files_or_none(tmp_path, monkeypatch):
    xml, weights = tmp_path / "model.xml", tmp_path / "model.bin"
    with pytest.raises(RuntimeError), atomic_paths(weights, xml) as (tmp_weights, tmp_xml):
        tmp_weights.write_bytes(b"w")
        raise RuntimeError("interrupted before the second file")
    assert list(tmp_path.iterdir()) == []

    import selecsls._io as io

    replace = io.os.replace

    def second_rename_fails(source, target):
        if Path(target) == xml:
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(io.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"), atomic_paths(weights, xml) as temporaries:
        for temporary in temporaries:
            temporary.write_bytes(b"x")
    assert list(tmp_path.iterdir()) == [], "the first file may not stay without the second"
    monkeypatch.undo()

    with atomic_paths(weights, xml) as (tmp_weights, tmp_xml):
        assert (tmp_weights.name, tmp_xml.name) == ("model.bin", "model.xml")  # same names, another folder
        tmp_weights.write_bytes(b"w")
        tmp_xml.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]


def test_atomic_paths_need_one_folder(tmp_path):
    with pytest.raises(ValueError, match="one folder"), atomic_paths(tmp_path / "a.xml", tmp_path / "sub" / "a.bin"):
        pass


def test_printable_escapes_only_what_a_terminal_acts_on():
    names = ["Ankle\u00a0boot", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "caf\u00e9 \u732b", "a\u200bb"]
    assert [printable(name) for name in names] == names, "names print exactly"
    assert printable("cat\x1b[2J\ndog\x07\x9b\u2028\u202eevil\udcff") == "cat?[2J?dog????evil?"
