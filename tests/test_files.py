"""Files written for a person (diffusion_jax/files.py): a full disk or a kill between the
temporary write and the rename leaves the previous file whole; the error is one line naming the
file and the cause; a dead process's temporaries are removed by the next write of the file."""

import errno
import os
import subprocess
import sys

import pytest

from diffusion_jax import files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_full_disk_keeps_the_previous_file_and_names_it_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "out" / "metrics.json"
    with files.atomic_write(str(path), "w") as f:
        f.write("old")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the write reaches the disk here
    with pytest.raises(files.WriteError) as e:
        with files.atomic_write(str(path), "w") as f:
            f.write("new")
    assert str(e.value) == (
        f"cannot write {path}: No space left on device (ENOSPC); any previous version of it is "
        "kept."
    )
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary left


def test_a_kill_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    """Interrupted between the complete temporary and the rename (KeyboardInterrupt raised from
    os.replace): the old file stays, the temporary goes."""
    path = tmp_path / "samples.npz"
    path.write_bytes(b"old")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(str(path)) as f:
            f.write(b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["samples.npz"]


def test_a_dead_processs_temporaries_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "samples.png"
    path.write_bytes(b"old")
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f"samples.png.tmp-{dead}").write_bytes(b"half")  # a kill -9 mid-write
    (tmp_path / f"samples.png.tmp-{alive}").write_bytes(b"busy")  # another run, writing now
    (tmp_path / f"samples.png.old-{dead}").mkdir()
    assert path.read_bytes() == b"old"  # the kill left the file whole
    with files.atomic_write(str(path)) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["samples.png", f"samples.png.tmp-{alive}"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "train.npy").write_bytes(b"old")
    with pytest.raises(files.WriteError, match=r"cannot write .*set: .*\(EROFS\)"):
        with files.atomic_path(str(out)) as tmp:
            os.makedirs(tmp)
            (tmp_path / f"set.tmp-{os.getpid()}" / "train.npy").write_bytes(b"half")
            raise OSError(errno.EROFS, "Read-only file system")
    assert os.listdir(tmp_path) == ["set"] and (out / "train.npy").read_bytes() == b"old"
    with files.atomic_path(str(out)) as tmp:
        os.makedirs(tmp)
        (tmp_path / f"set.tmp-{os.getpid()}" / "test.npy").write_bytes(b"new")
    assert os.listdir(tmp_path) == ["set"] and os.listdir(out) == ["test.npy"]
