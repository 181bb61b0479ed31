import pytest

from stages.files import atomic_path, write_json


def test_a_failed_write_leaves_the_previous_directory_intact(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind


def test_a_successful_write_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "model"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "old_only").write_text("x")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_files_are_replaced_atomically(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"a": object()})  # not serialisable: fails before the rename
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
