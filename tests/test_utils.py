import pytest

from nmm.utils import atomic_write, atomic_write_text


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temp file left behind
