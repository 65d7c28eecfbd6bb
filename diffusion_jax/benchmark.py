"""Speed of training and sampling on this machine, printed as one JSON line.

    python -m diffusion_jax.benchmark --config configs/cifar10_ddpm.py --batch_size 16 --steps 5
    python -m diffusion_jax.benchmark --config configs/cifar10_ddpm.py --batch_size 32 --steps 5 \\
        --config.model.conv_impl=fast --peer_python ~/peer-venv/bin/python

With ``--input_only`` (or ``--input``, beside the rest) it times the input pipeline instead
(or as well): ``input_images_per_s``, images per second that ``input_pipeline.train_batches``
delivers for the config's training split and batch (Grain workers ``data.num_workers``, batches
ahead ``data.prefetch_batches``), over ``--input_steps`` batches after one untimed batch, and
``input_device_images_per_s`` with the transfer to the devices included (``sharding.prefetch``):

    python -m diffusion_jax.benchmark --config configs/cifar10_ddpm.py --input_only \
        --config.data.dataset=DIR

Measured otherwise, on synthetic data of the config's shape (the data pipeline is not timed):

- ``train_images_per_s``: batch size / the median time of ``--steps`` full train steps (loss,
  gradient, optax update, EMA), the step of ``train.build``, the one builder the train loop
  uses too (state donated, replicated over the device mesh, batch split over it).
- ``sample_images_per_s``: sampling batch size / the median time of one ancestral step
  (``diffusion.p_sample``: one denoiser forward and the update), x donated, for ``--steps`` steps
  t = T-1, T-2, ... (null for ``training.objective = "ncsn"``, which has no ancestral sampler).
- ``compile_s``: lowering + compilation of the train step (``sample_compile_s``: the sampling
  step). With a persistent compilation cache configured (``compilation_cache``: true) this can be
  a cache hit.
- ``chain_s`` (with ``--chain``): seconds for one whole sampling chain of
  ``sample_batch_size`` samples (``sampling.make_sample_fn``: ``sampling.method`` over
  ``sampling.num_steps`` steps or all T, in compiled segments), timed on its second
  call; ``chain_first_call_s`` includes compilation. E.g. the paper's 256 samples x 1000 steps:
  ``--chain --sample_batch_size 256``.
- ``fwd_gflops_per_image``: XLA's cost analysis of the lowered forward pass (train=False) / batch;
  ``train_gflops_per_image``: of the whole train step / batch (before compilation, so the
  same count on every backend).
- ``train_gflops`` = train-step FLOPs / median step time; ``frac_of_peak`` = that / ``peak_gflops``.
- ``contention``: CPU-seconds per wall-second used by this process (``own_cores``) and by every
  other process on the machine (``other_cores``) during the timed train steps; on a shared machine
  compare runs only when ``other_cores`` is small. ``train_cpu_s_per_step`` is the process CPU time
  per step (less sensitive to other processes than the wall time).

``--peer_python`` also runs the PyTorch reference peer (``../shared/bench/peer_torch_unet.py``,
diffusers' UNet2DModel with the same architecture) at the same batch sizes right after, in this
run, and reports its figures and the ratios ``train_vs_peer`` and ``sample_vs_peer``.

Peak. On a CPU, ``peak_gflops`` is what ``--cpu_peak_gflops`` says (measure it on the machine,
e.g. with an FMA loop; absent: null, and ``frac_of_peak`` null). On GPUs it is the vendor's
nominal dense figure for the compute dtype from ``GPU_PEAK_TFLOPS`` (null for devices not in the
table). Measured figures belong in experiments/perf/README.md, not here.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.cpu import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Train batch (default: training.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps and sampling steps (median).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch_size", 0, "Sampling batch (default: sampling.batch_size)."
)
_SKIP_SAMPLE = flags.DEFINE_bool("skip_sample", False, "Time the train step only.")
_INPUT_ONLY = flags.DEFINE_bool("input_only", False, "Time the input pipeline only.")
_INPUT = flags.DEFINE_bool("input", False, "Also time the input pipeline.")
_INPUT_STEPS = flags.DEFINE_integer("input_steps", 200, "Batches timed by --input(_only).")
_CHAIN = flags.DEFINE_bool(
    "chain",
    False,
    "Also time the whole sampling chain as the product runs it (sampling.make_sample_fn) for "
    "one batch of the sampling size.",
)
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", "", "A Python with torch + diffusers: also run the PyTorch peer."
)
_PEER_SCRIPT = flags.DEFINE_string(
    "peer_script", "", "The peer benchmark script (needed with --peer_python)."
)
_CPU_PEAK = flags.DEFINE_float(
    "cpu_peak_gflops", 0.0, "This CPU's measured FP32 peak, GFLOP/s (0: unknown)."
)
_CPU_CONV = flags.DEFINE_string(
    "cpu_conv_library", runtime.default_library(), runtime.CPU_CONV_HELP
)
_PEER_CONFIG = flags.DEFINE_string("peer_config", "ddpm_cifar10", "The peer's --config.")
_PEER_OVERRIDE = flags.DEFINE_multi_string(
    "peer_override",
    [],
    "KEY=JSON, passed to the peer as --override KEY=JSON (one UNet2DModel argument of its "
    "--config), e.g. --peer_override=sample_size=28; repeat for more.",
)
flags.mark_flags_as_required(["config"])

# Nominal dense peaks, TFLOP/s: (float32 without tensor cores, bfloat16 tensor cores). Matched
# against jax's device_kind by substring, first match wins.
GPU_PEAK_TFLOPS = {
    "H200": (67.0, 989.0),
    "H100": (67.0, 989.0),
    "A100": (19.5, 312.0),
    "A10G": (31.2, 125.0),
    "L40S": (91.6, 362.0),
    "L4": (30.3, 121.0),
    "V100": (15.7, 125.0),
    "T4": (8.1, 65.0),
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _snapshot() -> tuple[float, float, float]:
    """(wall s, this process's CPU s, CPU s the whole machine spent busy)."""
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return time.perf_counter(), time.process_time(), busy


def _contention(a, b) -> dict[str, float]:
    wall = b[0] - a[0]
    own = b[1] - a[1]
    return dict(
        own_cores=round(own / wall, 3), other_cores=round(max(b[2] - a[2] - own, 0.0) / wall, 3)
    )


def _flops(lowered) -> float | None:
    """FLOPs of a lowered (not yet compiled) program, all devices together: XLA's cost analysis of
    the HLO before any backend rewrites it. A compiled program's count depends on the backend
    (on GPUs the cuDNN convolutions are custom calls that it does not count) and, split over
    devices, is one device's share."""
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _peak_gflops(device, dtype_name: str, cpu_peak_gflops: float | None) -> float | None:
    if device.platform == "cpu":
        return cpu_peak_gflops or None
    kind = getattr(device, "device_kind", "")
    for name, (fp32, bf16) in GPU_PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return 1e3 * (bf16 if dtype_name == "bfloat16" else fp32)
    return None


def _timed(fn, n: int) -> tuple[list[float], list[float], dict[str, float]]:
    """Calls fn() n times; returns wall seconds, process CPU seconds, and the contention."""
    walls, cpus = [], []
    start = _snapshot()
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, _contention(start, _snapshot())


def _run_peer(mode: str, batch: int, steps: int) -> dict:
    cmd = [
        _PEER_PYTHON.value,
        _PEER_SCRIPT.value,
        "--config",
        _PEER_CONFIG.value,
        "--mode",
        mode,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--threads",
        str(len(os.sched_getaffinity(0))),
    ]
    for item in _PEER_OVERRIDE.value:
        cmd += ["--override", item]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    r = res[mode]
    return dict(
        images_per_s=r["images_per_s_median"],
        step_s=r["median_s"],
        all_s=r["all_s"],
        contention=r["contention"],
        gflops=r["achieved_gflops_median"],
        fwd_gflops_per_image=res["fwd_flops_per_image"] / 1e9,
        num_params=res.get("params"),
        overrides=list(_PEER_OVERRIDE.value),
        versions=res["versions"],
    )


def compile_train_step(config, batch_size: int) -> dict:
    """The train step of ``train.build`` (state donated and replicated over the device mesh,
    batch split over it), compiled, with its initial state and a synthetic batch of the config's
    shape, for a copy of ``config`` at ``batch_size``. Returns dict(lowered, compiled, compile_s,
    state, batch, keys, mesh, model, config)."""
    import jax
    import numpy as np

    from diffusion_jax import evaluation, input_pipeline, objectives, sharding, train

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.training.batch_size = batch_size
    config = evaluation.prepare(config, check_data=False)  # random images
    mesh = sharding.make_mesh()
    program = train.build(config, mesh)
    keys = objectives.run_keys(config.seed)
    state = program.init(keys["init"])
    shape = input_pipeline.example_shape(config)
    rng = np.random.default_rng(0)
    if config.data.image_size:
        host_batch = rng.integers(0, config.data.num_bins, (batch_size, *shape), dtype=np.uint8)
    else:
        host_batch = rng.standard_normal((batch_size, *shape), dtype=np.float32)
    batch = {"image": host_batch}
    if config.model.num_classes:  # a conditional model: random classes too
        batch["label"] = rng.integers(0, config.model.num_classes, batch_size, dtype=np.int32)
    batch = jax.device_put(batch, sharding.data_sharded(mesh))
    t0 = time.perf_counter()
    lowered = program.step.lower(state, batch, keys["train"])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    return dict(
        lowered=lowered,
        compiled=compiled,
        compile_s=compile_s,
        state=state,
        batch=batch,
        keys=keys,
        mesh=mesh,
        model=program.model,
        config=config,
    )


# Decimals each figure is printed with (benchmark() returns them unrounded); others as they are.
PRINT_DIGITS = {
    "train_images_per_s": 3,
    "train_images_per_s_best": 3,
    "sample_images_per_s": 3,
    "compile_s": 2,
    "sample_compile_s": 2,
    "fwd_gflops_per_image": 4,
    "train_gflops_per_image": 4,
    "frac_of_peak": 4,
    "train_step_s": 4,
    "train_step_all_s": 4,
    "sample_step_s": 4,
    "sample_step_all_s": 4,
    "train_cpu_s_per_step": 3,
    "train_gflops": 1,
    "sample_gflops": 1,
    "chain_s": 3,
    "chain_first_call_s": 3,
    "chain_images_per_s": 4,
    "train_vs_peer": 3,
    "sample_vs_peer": 3,
}


def rounded(out: dict) -> dict:
    """A copy of ``benchmark()``'s figures rounded for printing (``PRINT_DIGITS``)."""

    def fix(value, digits):
        if isinstance(value, list):
            return [fix(v, digits) for v in value]
        return round(value, digits) if isinstance(value, float) else value

    return {k: fix(v, PRINT_DIGITS[k]) if k in PRINT_DIGITS else v for k, v in out.items()}


def benchmark(
    config,
    batch_size: int,
    steps: int,
    warmup: int,
    sample_batch: int,
    chain: bool = False,
    cpu_peak_gflops: float | None = None,
) -> dict:
    """The figures of the module docstring, unrounded (``rounded`` rounds them for printing)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion_jax import diffusion as diffusion_lib
    from diffusion_jax import input_pipeline, models, objectives, sampling, sharding

    built = compile_train_step(config, batch_size)
    config = built["config"]  # a checked copy: the caller's config is left as it is
    compiled, compile_s, state = built["compiled"], built["compile_s"], built["state"]
    batch, keys, mesh, model = built["batch"], built["keys"], built["mesh"], built["model"]
    repl, data_sharding = sharding.replicated(mesh), sharding.data_sharded(mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    shape = input_pipeline.example_shape(config)
    rng = np.random.default_rng(0)
    train_flops = _flops(built["lowered"])

    # Forward-pass FLOPs (train=False), from XLA's cost analysis of the jitted model.
    x = jnp.zeros((batch_size, *shape), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    fwd_flops = _flops(fwd.lower(state.params, x, t))

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, keys["train"])
        jax.block_until_ready(metrics)

    for _ in range(warmup):
        one_step()
    walls, cpus, contention = _timed(one_step, steps)
    step_s = statistics.median(walls)
    device = jax.devices()[0]
    dtype_name = config.model.dtype
    peak = _peak_gflops(device, dtype_name, cpu_peak_gflops)
    train_gflops = train_flops / step_s / 1e9 if train_flops else None
    out = dict(
        train_images_per_s=batch_size / step_s,
        sample_images_per_s=None,
        compile_s=compile_s,
        fwd_gflops_per_image=fwd_flops / batch_size / 1e9 if fwd_flops else None,
        frac_of_peak=train_gflops / peak if train_gflops and peak else None,
        device=(
            f"cpu: {_cpu_name()}, {os.cpu_count()} cores"
            if device.platform == "cpu"
            else f"{device.platform}: {device.device_kind}"
        ),
        device_count=jax.device_count(),
        config=config.data.dataset,
        model=config.model.name,
        num_params=int(num_params),
        conv_impl=config.model.get("conv_impl"),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        dtype=dtype_name,
        remat=config.model.get("remat"),
        batch_size=batch_size,
        steps=steps,
        train_step_s=step_s,
        train_step_all_s=walls,
        train_images_per_s_best=batch_size / min(walls),
        train_cpu_s_per_step=statistics.median(cpus),
        train_gflops_per_image=train_flops / batch_size / 1e9 if train_flops else None,
        train_gflops=train_gflops,
        peak_gflops=peak,
        contention=contention,
        jax=jax.__version__,
        compilation_cache=bool(jax.config.jax_compilation_cache_dir),
    )
    params = holder["state"].ema_params  # the initial state's buffers were donated

    if sample_batch and config.training.objective in sampling.SAMPLERS["ancestral"].objectives:
        sharding.check_batch_size(sample_batch, "sampling.batch_size")
        d = objectives.make_diffusion(config)

        def sample_step(params, x, t, key):
            net = models.model_fn(model, params)
            p = diffusion_lib.p_sample(
                d, net, x, t, key, clip_denoised=config.sampling.clip_denoised
            )
            return p["sample"]

        sample_fn = jax.jit(
            sample_step,
            in_shardings=(repl, data_sharding, data_sharding, repl),
            out_shardings=data_sharding,
            donate_argnums=(1,),
        )
        xs = jax.device_put(
            rng.standard_normal((sample_batch, *shape), dtype=np.float32), data_sharding
        )
        ts = jax.device_put(np.full((sample_batch,), d.num_timesteps - 1, np.int32), data_sharding)
        key = keys["sample"]
        t0 = time.perf_counter()
        sample_lowered = sample_fn.lower(params, xs, ts, key)
        sample_compiled = sample_lowered.compile()
        sample_compile_s = time.perf_counter() - t0
        sample_flops = _flops(sample_lowered)
        cur = {"x": xs, "i": 0}

        def one_sample():
            i = cur["i"]
            t_i = jax.device_put(
                np.full((sample_batch,), max(d.num_timesteps - 1 - i, 0), np.int32), data_sharding
            )
            cur["x"] = sample_compiled(params, cur["x"], t_i, jax.random.fold_in(key, i))
            cur["x"].block_until_ready()
            cur["i"] = i + 1

        for _ in range(warmup):
            one_sample()
        s_walls, s_cpus, s_contention = _timed(one_sample, steps)
        s_step = statistics.median(s_walls)
        out.update(
            sample_images_per_s=sample_batch / s_step,
            sample_batch_size=sample_batch,
            sample_step_s=s_step,
            sample_step_all_s=s_walls,
            sample_compile_s=sample_compile_s,
            sample_gflops=sample_flops / s_step / 1e9 if sample_flops else None,
            sample_contention=s_contention,
        )
    if sample_batch and chain:
        with config.unlocked():
            config.sampling.batch_size = config.sampling.num_samples = sample_batch
        sampler = sampling.make_sample_fn(config, model, mesh, desc="chain")
        t0 = time.perf_counter()
        sampler(params, keys["sample"])
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = sampler(params, jax.random.fold_in(keys["sample"], 1))
        chain_s = time.perf_counter() - t0
        if not np.all(np.isfinite(samples)):
            raise FloatingPointError("the sampling chain produced non-finite values")
        chain = sampling.SAMPLERS[sampling.method(config)].build(config, model)
        chain_steps = chain.num_steps * chain.calls_per_step  # network calls per sample
        out.update(
            chain_method=sampling.method(config),
            chain_steps=chain_steps,
            chain_batch_size=sample_batch,
            chain_s=chain_s,
            chain_first_call_s=first_s,
            chain_images_per_s=sample_batch / chain_s,
        )
    return out


def input_benchmark(config, batch_size: int, steps: int) -> dict:
    """Images/s of the training batches of ``config`` (its real data), host side and with the
    transfer to the devices."""
    import jax
    import numpy as np

    from diffusion_jax import evaluation, input_pipeline, sharding

    config = config.copy_and_resolve_references()
    config.training.batch_size = batch_size
    config = evaluation.prepare(config)
    t0 = time.perf_counter()
    source = input_pipeline.load_split(config, config.data.train_split)
    open_s = time.perf_counter() - t0
    out = dict(
        input_dataset=config.data.dataset,
        input_kind=input_pipeline.dataset_kind(config.data.dataset),
        input_num_examples=source.num_examples,
        input_batch_size=batch_size,
        input_workers=input_pipeline.num_workers(config),
        input_prefetch_batches=config.data.prefetch_batches,
        input_open_s=open_s,
    )
    mesh = sharding.make_mesh()
    for name, wrap in (
        ("input_images_per_s", lambda it: it),
        ("input_device_images_per_s", lambda it: sharding.prefetch(mesh, it)),
    ):
        batches = wrap(input_pipeline.train_batches(config, source, 0))
        jax.block_until_ready(next(batches))  # workers started, first batch out
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(batches)
        jax.block_until_ready(batch)
        out[name] = steps * batch_size / (time.perf_counter() - t0)
        del batches
    out["input_bytes_per_image"] = int(np.prod(input_pipeline.example_shape(config)))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    batch = _BATCH.value or config.training.batch_size
    sample_batch = 0 if _SKIP_SAMPLE.value else (_SAMPLE_BATCH.value or config.sampling.batch_size)
    if _PEER_PYTHON.value and not _PEER_SCRIPT.value:
        raise app.UsageError(
            "--peer_python needs --peer_script (e.g. shared/bench/peer_torch_unet.py)."
        )
    library = _CPU_CONV.value
    runtime.configure_cpu_convolutions(library)  # before JAX starts
    malloc_tuned = runtime.configure_allocator()
    if _INPUT_ONLY.value:
        print(json.dumps(rounded(input_benchmark(config, batch, _INPUT_STEPS.value))), flush=True)
        return
    out = benchmark(
        config, batch, _STEPS.value, _WARMUP.value, sample_batch, _CHAIN.value, _CPU_PEAK.value
    )
    if _INPUT.value:
        out.update(input_benchmark(config, batch, _INPUT_STEPS.value))
    out["cpu_conv_library"] = library
    out["malloc_tuned"] = malloc_tuned
    if _PEER_PYTHON.value:
        peer = {"train": _run_peer("train", batch, _STEPS.value)}
        out["train_vs_peer"] = out["train_images_per_s"] / peer["train"]["images_per_s"]
        if sample_batch:
            peer["sample"] = _run_peer("sample", sample_batch, _STEPS.value)
            out["sample_vs_peer"] = out["sample_images_per_s"] / peer["sample"]["images_per_s"]
        out["peer"] = peer
    print(json.dumps(rounded(out)), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
