import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import tiny_config

from diffusion_jax import train, workdir_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, host, pid):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
        json.dump({"host": host, "pid": pid, "since": 0}, f)


def test_held_while_running_released_after(tmp_path):
    path = tmp_path / workdir_lock.LOCK_NAME
    with workdir_lock.hold(str(tmp_path)):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {os.getpid()} on"):
            with workdir_lock.hold(str(tmp_path)):
                pass
    assert not path.exists()
    with pytest.raises(RuntimeError), workdir_lock.hold(str(tmp_path)):
        raise RuntimeError("the run failed")
    assert not path.exists()  # released however the block ends


def test_a_second_train_process_is_refused_before_anything_is_written(tmp_path):
    workdir = str(tmp_path)
    _write_lock(workdir, socket.gethostname(), os.getppid())  # a live process: our parent
    with pytest.raises(workdir_lock.WorkdirLocked, match="in use by another train process"):
        train.train_and_evaluate(tiny_config(), workdir)
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]
    _write_lock(workdir, "another-host", 1)  # another host's lock cannot be checked: held
    with pytest.raises(workdir_lock.WorkdirLocked, match="another-host"):
        train.train_and_evaluate(tiny_config(), workdir)


@pytest.mark.parametrize("content", ["dead", "garbage"])
def test_a_stale_lock_is_taken_over(tmp_path, content):
    workdir = str(tmp_path)
    if content == "dead":
        _write_lock(workdir, socket.gethostname(), _dead_pid())
    else:
        (tmp_path / workdir_lock.LOCK_NAME).write_text("not json")
    with workdir_lock.hold(workdir):
        holder = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()


def test_other_processes_of_a_multi_host_run_take_no_lock(tmp_path):
    _write_lock(str(tmp_path), "another-host", 1)
    with workdir_lock.hold(str(tmp_path), enabled=False):
        pass


def test_a_lock_being_taken_is_held_even_before_it_names_its_holder(tmp_path):
    """Row 10 of issue 28: the holder has created train.lock (and flocked it) but written nothing
    yet; the second process must not take the empty file for a stale one."""
    path = tmp_path / workdir_lock.LOCK_NAME
    script = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert path.read_text() == ""
        with pytest.raises(workdir_lock.WorkdirLocked, match="in use by another train process"):
            with workdir_lock.hold(str(tmp_path)):
                pass
        assert path.exists()  # not removed as stale
    finally:
        proc.kill()
        proc.wait()
    # Its process gone, the kernel dropped the flock: the empty file is free.
    with workdir_lock.hold(str(tmp_path)):
        assert json.loads(path.read_text())["pid"] == os.getpid()
