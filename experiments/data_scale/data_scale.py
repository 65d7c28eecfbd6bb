"""Data larger than memory: a synthetic on-disk CIFAR-shaped set of >= 4 GB, read as a memory
map, with the input pipeline's speed, the training process's memory, exact resume after kill -9
and two processes reading disjoint halves of each batch.

    python experiments/data_scale/data_scale.py --data_dir /tmp/big \\
        [--num_images 1400000] [--outdir ...]

Steps (each prints and records its figures in ``data_scale.json`` in ``--outdir``):

1. ``write``: ``--num_images`` random 32x32x3 uint8 images and labels 0..9 as a prepared folder
   (``train.npy``, ``train_labels.npy``, ``test.npy`` of 1,000, ``dataset.json``: what
   ``python -m diffusion_jax.prepare_data`` writes), a chunk at a time; skipped when present.
2. ``input``: ``python -m diffusion_jax.benchmark --input_only`` with ``configs/cifar10_ddpm.py``
   (batch 128, random flips) on that folder: images/s from disk, host side and onto the devices.
3. ``memory``: the same short training run (the digits U-Net, ``--run_steps`` steps, no
   evaluation) on digits, on the big set, and, as a control with the big set's image shape, on
   its 1,000-image test split; the peak anonymous resident memory of each process (RssAnon of
   /proc/PID/status sampled every 20 ms: memory-mapped file pages are not anonymous) and of the
   file-backed pages (RssFile).
4. ``resume``: the run on the big set killed with SIGKILL after its first checkpoint, run again
   to the end; its parameters against an uninterrupted run's, bit for bit.
5. ``two_processes``: the run as 2 processes x 1 CPU device (``--distributed``, a local
   coordinator), each reading its half of every global batch, against 1 process x 2 devices.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common

import common
import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SIZE = 32
RUN = {  # the digits U-Net on 32x32x3 images, a short run
    "data.image_size": SIZE,
    "data.num_channels": 3,
    "data.num_bins": 256,
    "data.random_flip": True,
    "model.fourier_features": (),
    "training.batch_size": 64,
    "training.log_every": 5,
    "training.checkpoint_every": 10,
    "training.sample_every": 0,
    "training.eval_at_end": False,
}


def add_args(parser) -> None:
    parser.add_argument("--data_dir", required=True, help="the synthetic set (written once)")
    parser.add_argument("--num_images", type=int, default=1_400_000)
    parser.add_argument("--run_steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--workdir", default="/tmp/data_scale_runs")


def write(data_dir: str, num_images: int) -> dict:
    """The prepared folder of random images (skipped when complete)."""
    marker = os.path.join(data_dir, "dataset.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", num_images), ("test", 1000)):
        path = os.path.join(data_dir, f"{split}.npy")
        out = np.lib.format.open_memmap(path, "w+", np.uint8, (n, SIZE, SIZE, 3))
        for start in range(0, n, 50_000):
            stop = min(start + 50_000, n)
            out[start:stop] = rng.integers(0, 256, (stop - start, SIZE, SIZE, 3), np.uint8)
        out.flush()
        del out
        np.save(os.path.join(data_dir, f"{split}_labels.npy"), rng.integers(0, 10, n, np.int32))
        splits[split] = {"num_examples": n, "shape": [SIZE, SIZE, 3], "labels": True}
    meta = {"source": "synthetic", "class_names": [str(k) for k in range(10)], "splits": splits}
    with open(marker, "w") as f:
        json.dump(meta, f)
    return meta


def _env(devices: int = 1) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=common.ROOT,
        TF_CPP_MIN_LOG_LEVEL="3",
    )


def _flags(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = "(" + "".join(f"{v!r}," for v in value) + ")"
        out.append(f"--config.{key}={value}")
    return out


def _main_cmd(workdir: str, overrides: dict, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        *_flags(overrides),
        *extra,
    ]


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_measured(cmd: list[str], env: dict, log: str) -> dict:
    """Run ``cmd``; its wall time and peak RssAnon / RssFile (MiB), sampled every 20 ms."""
    peak = {"RssAnon": 0, "RssFile": 0}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=out, stderr=out)

        def sample():
            while proc.poll() is None:
                try:
                    for k in peak:
                        peak[k] = max(peak[k], _status_kb(proc.pid, k))
                except (FileNotFoundError, ProcessLookupError):
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=sample)
        watcher.start()
        proc.wait()
        watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}); see {log}")
    return {
        "wall_s": time.perf_counter() - start,
        "peak_anon_mib": peak["RssAnon"] / 1024,
        "peak_file_mib": peak["RssFile"] / 1024,
    }


def _params(workdir: str) -> list[np.ndarray]:
    import jax

    from diffusion_jax import checkpoints

    return [np.asarray(x) for x in jax.tree.leaves(checkpoints.load_params(workdir, ema=False))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    args = common.parse_args(RESULTS, __doc__, steps=0, argv=argv, extra=add_args)
    os.makedirs(args.workdir, exist_ok=True)
    results = {}

    t0 = time.perf_counter()
    meta = write(args.data_dir, args.num_images)
    size = sum(os.path.getsize(os.path.join(args.data_dir, f)) for f in os.listdir(args.data_dir))
    results["write"] = {"seconds": time.perf_counter() - t0, "bytes": size, "meta": meta}
    print(f"data set: {size / 2**30:.3f} GiB in {args.data_dir}", flush=True)

    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_jax.benchmark",
            "--config=configs/cifar10_ddpm.py",
            "--input_only",
            f"--config.data.dataset={args.data_dir}",
        ],
        cwd=common.ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    results["input"] = json.loads(bench.stdout.strip().splitlines()[-1])
    print("input:", results["input"], flush=True)

    steps = {"training.num_train_steps": args.run_steps}
    big = {**RUN, **steps, "data.dataset": args.data_dir}
    digits = {**steps, **{k: v for k, v in RUN.items() if not k.startswith("data.")}}
    digits["model.fourier_features"] = ()
    results["memory"] = {}
    small = {**big, "data.train_split": "test"}  # 1,000 images of the same shape
    for name, overrides in (("digits", digits), ("small", small), ("big", big)):
        workdir = os.path.join(args.workdir, f"memory_{name}")
        subprocess.run(["rm", "-rf", workdir], check=True)
        log = os.path.join(args.workdir, f"memory_{name}.log")
        results["memory"][name] = run_measured(_main_cmd(workdir, overrides), _env(), log)
        print(name, results["memory"][name], flush=True)
    m = results["memory"]
    m["anon_growth_mib"] = m["big"]["peak_anon_mib"] - m["digits"]["peak_anon_mib"]
    m["anon_growth_vs_small_mib"] = m["big"]["peak_anon_mib"] - m["small"]["peak_anon_mib"]

    reference = os.path.join(args.workdir, "memory_big")
    killed = os.path.join(args.workdir, "killed")
    subprocess.run(["rm", "-rf", killed], check=True)
    proc = subprocess.Popen(
        _main_cmd(killed, big),
        cwd=common.ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = os.path.join(killed, "checkpoints")
    while proc.poll() is None and not (
        os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))
    ):
        time.sleep(0.05)
    time.sleep(1.0)  # somewhere after the first checkpoint, maybe in the middle of a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from diffusion_jax import checkpoints

    killed_at = checkpoints.make_manager(killed).latest_step()
    subprocess.run(
        _main_cmd(killed, big), cwd=common.ROOT, env=_env(), check=True, capture_output=True
    )
    same = all(
        np.array_equal(a, b) for a, b in zip(_params(reference), _params(killed), strict=True)
    )
    results["resume"] = {"killed_at_checkpoint": killed_at, "bit_identical": same}
    print("resume:", results["resume"], flush=True)

    two = os.path.join(args.workdir, "two_processes")
    one = os.path.join(args.workdir, "one_process")
    subprocess.run(["rm", "-rf", two, one], check=True)
    cluster = {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
        "JAX_NUM_PROCESSES": "2",
    }
    procs = []
    for i in range(2):
        env = {**_env(), **cluster, "JAX_PROCESS_ID": str(i)}
        log = open(os.path.join(args.workdir, f"two_processes.{i}.log"), "w")
        cmd = _main_cmd(two, big, "--distributed")
        procs.append(subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=log, stderr=log))
    subprocess.run(
        _main_cmd(one, big), cwd=common.ROOT, env=_env(2), check=True, capture_output=True
    )
    codes = [p.wait() for p in procs]
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(_params(one), _params(two), strict=True)]
    results["two_processes"] = {"exit_codes": codes, "max_param_diff_vs_one_process": max(diffs)}
    print("two processes:", results["two_processes"], flush=True)

    with open(os.path.join(args.outdir, "data_scale.json"), "w") as f:
        json.dump(common.to_builtin(results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
