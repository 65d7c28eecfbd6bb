"""Speed of training and sampling on this machine, printed as one JSON line.

    python -m diffusion_jax.benchmark --config configs/cifar10_ddpm.py --batch_size 16 --steps 5
    python -m diffusion_jax.benchmark --config configs/cifar10_ddpm.py --batch_size 32 --steps 5 \\
        --config.model.conv_impl=fast --peer_python ~/peer-venv/bin/python

Measured, on synthetic data of the config's shape (the data pipeline is not timed):

- ``train_images_per_s``: batch size / the median time of ``--steps`` full train steps (loss,
  gradient, optax update, EMA), the step built by ``train.make_train_step`` from
  ``train.make_optimizer`` and ``train.init_state`` and jitted as ``train.py`` jits it (state
  donated, replicated over the device mesh, batch split over it).
- ``sample_images_per_s``: sampling batch size / the median time of one ancestral step
  (``diffusion.p_sample``: one denoiser forward and the update), x donated, for ``--steps`` steps
  t = T-1, T-2, ... (null for ``training.objective = "ncsn"``, which has no ancestral sampler).
- ``compile_s``: lowering + compilation of the train step (``sample_compile_s``: the sampling
  step). With a persistent compilation cache configured (``compilation_cache``: true) this can be
  a cache hit.
- ``chain_s`` (with ``--chain``): seconds for one whole sampling chain of
  ``sample_batch_size`` samples (``evaluate.make_sample_fn``: ``sampling.method``, ancestral or
  DDIM, over ``sampling.num_steps`` steps or all T, one compiled ``lax.scan``), timed on its second
  call; ``chain_first_call_s`` includes compilation. E.g. the paper's 256 samples x 1000 steps:
  ``--chain --sample_batch_size 256``.
- ``fwd_gflops_per_image``: XLA's cost analysis of the jitted forward pass (train=False) / batch;
  ``train_gflops_per_image``: of the whole compiled train step / batch.
- ``train_gflops`` = train-step FLOPs / median step time; ``frac_of_peak`` = that / ``peak_gflops``.
- ``contention``: CPU-seconds per wall-second used by this process (``own_cores``) and by every
  other process on the machine (``other_cores``) during the timed train steps; on a shared machine
  compare runs only when ``other_cores`` is small. ``train_cpu_s_per_step`` is the process CPU time
  per step (less sensitive to other processes than the wall time).

``--peer_python`` also runs the PyTorch reference peer (``../shared/bench/peer_torch_unet.py``,
diffusers' UNet2DModel with the same architecture) at the same batch sizes right after, in this
run, and reports its figures and the ratios ``train_vs_peer`` and ``sample_vs_peer``.

Peak. ``CPU_FP32_PEAK_GFLOPS`` = 220 is the FP32 peak documented for the project's 2-core
benchmark machine (AMD EPYC, 2 cores; ../shared/bench/README.md: an AVX2 FMA loop measured
213-230 GFLOP/s). That machine's cores also execute AVX-512 FMAs at full width (Zen 5): an
AVX-512 FMA loop measured 536-539 GFLOP/s there with the machine idle, so ``frac_of_peak`` against
220 can exceed 1; ``frac_of_avx512_peak`` divides by ``CPU_AVX512_FP32_PEAK_GFLOPS`` = 538 as well.
On other CPUs both are only indicative. On GPUs the peak is the vendor's nominal dense figure for
the compute dtype from ``GPU_PEAK_TFLOPS`` (null for devices not in the table).
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

from diffusion_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Train batch (default: training.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps and sampling steps (median).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch_size", 0, "Sampling batch (default: sampling.batch_size)."
)
_SKIP_SAMPLE = flags.DEFINE_bool("skip_sample", False, "Time the train step only.")
_CHAIN = flags.DEFINE_bool(
    "chain",
    False,
    "Also time the whole sampling chain as the product runs it (evaluate.make_sample_fn: one "
    "compiled scan over sampling.num_steps steps, or all T) for one batch of the sampling size.",
)
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", "", "A Python with torch + diffusers: also run the PyTorch peer."
)
_PEER_SCRIPT = flags.DEFINE_string(
    "peer_script",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "shared",
        "bench",
        "peer_torch_unet.py",
    ),
    "The peer benchmark script.",
)
_PEER_CONFIG = flags.DEFINE_string("peer_config", "ddpm_cifar10", "The peer's --config.")
flags.mark_flags_as_required(["config"])

# FP32 peak of the project's benchmark CPU (see the module docstring), GFLOP/s.
CPU_FP32_PEAK_GFLOPS = 220.0
CPU_AVX512_FP32_PEAK_GFLOPS = 538.0
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


def _flops(compiled, num_devices: int = 1) -> float | None:
    """FLOPs of a compiled program over all its devices: XLA's cost analysis counts the program
    one device runs, which for a batch split over ``num_devices`` devices is 1/num_devices of it."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) * num_devices if cost and "flops" in cost else None


def _peak_gflops(device, dtype_name: str) -> float | None:
    if device.platform == "cpu":
        return CPU_FP32_PEAK_GFLOPS
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
        versions=res["versions"],
    )


def compile_train_step(config, batch_size: int) -> dict:
    """The train step as ``train.py`` jits it (state donated and replicated over the device mesh,
    batch split over it), compiled, with its initial state and a synthetic batch of the config's
    shape. Returns dict(compiled, compile_s, state, batch, keys, mesh, model)."""
    import jax
    import numpy as np

    from diffusion_jax import builders, input_pipeline, models, sharding, train

    config.training.batch_size = batch_size
    builders.validate_config(config)
    sharding.check_batch_size(batch_size)
    mesh = sharding.make_mesh()
    repl, data_sharding = sharding.replicated(mesh), sharding.data_sharded(mesh)
    model = models.get_model(config)
    optimizer, schedule = train.make_optimizer(config)
    keys = builders.run_keys(config.seed)
    state = jax.jit(train.init_state(config, model, optimizer), out_shardings=repl)(keys["init"])

    shape = input_pipeline.example_shape(config)
    rng = np.random.default_rng(0)
    if config.data.image_size:
        host_batch = rng.integers(0, config.data.num_bins, (batch_size, *shape), dtype=np.uint8)
    else:
        host_batch = rng.standard_normal((batch_size, *shape), dtype=np.float32)
    batch = jax.device_put(host_batch, data_sharding)

    step_fn = jax.jit(
        train.make_train_step(config, model, optimizer, schedule),
        in_shardings=(repl, data_sharding, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, keys["train"]).compile()
    compile_s = time.perf_counter() - t0
    return dict(
        compiled=compiled,
        compile_s=compile_s,
        state=state,
        batch=batch,
        keys=keys,
        mesh=mesh,
        model=model,
    )


def benchmark(
    config, batch_size: int, steps: int, warmup: int, sample_batch: int, chain: bool = False
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion_jax import builders, evaluate, input_pipeline, sharding
    from diffusion_jax import diffusion as diffusion_lib

    built = compile_train_step(config, batch_size)
    compiled, compile_s, state = built["compiled"], built["compile_s"], built["state"]
    batch, keys, mesh, model = built["batch"], built["keys"], built["mesh"], built["model"]
    repl, data_sharding = sharding.replicated(mesh), sharding.data_sharded(mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    shape = input_pipeline.example_shape(config)
    rng = np.random.default_rng(0)
    train_flops = _flops(compiled, len(mesh.devices.flat))

    # Forward-pass FLOPs (train=False), from XLA's cost analysis of the jitted model.
    x = jnp.zeros((batch_size, *shape), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    fwd_flops = _flops(fwd.lower(state.params, x, t).compile())

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
    peak = _peak_gflops(device, dtype_name)
    train_gflops = train_flops / step_s / 1e9 if train_flops else None
    out = dict(
        train_images_per_s=round(batch_size / step_s, 3),
        sample_images_per_s=None,
        compile_s=round(compile_s, 2),
        fwd_gflops_per_image=round(fwd_flops / batch_size / 1e9, 4) if fwd_flops else None,
        frac_of_peak=round(train_gflops / peak, 4) if train_gflops and peak else None,
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
        cpu_conv_library=config.cpu_conv_library,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        dtype=dtype_name,
        remat=config.model.get("remat"),
        batch_size=batch_size,
        steps=steps,
        train_step_s=round(step_s, 4),
        train_step_all_s=[round(w, 4) for w in walls],
        train_images_per_s_best=round(batch_size / min(walls), 3),
        train_cpu_s_per_step=round(statistics.median(cpus), 3),
        train_gflops_per_image=round(train_flops / batch_size / 1e9, 4) if train_flops else None,
        train_gflops=round(train_gflops, 1) if train_gflops else None,
        peak_gflops=peak,
        contention=contention,
        jax=jax.__version__,
        compilation_cache=bool(jax.config.jax_compilation_cache_dir),
    )
    if device.platform == "cpu" and train_gflops:
        out["frac_of_avx512_peak"] = round(train_gflops / CPU_AVX512_FP32_PEAK_GFLOPS, 4)
    params = holder["state"].ema_params  # the initial state's buffers were donated

    if sample_batch and config.training.objective != "ncsn":
        sharding.check_batch_size(sample_batch, "sampling.batch_size")
        d = builders.make_diffusion(config)

        def sample_step(params, x, t, key):
            net = builders.model_fn(model, params)
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
        sample_compiled = sample_fn.lower(params, xs, ts, key).compile()
        sample_compile_s = time.perf_counter() - t0
        sample_flops = _flops(sample_compiled, len(mesh.devices.flat))
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
            sample_images_per_s=round(sample_batch / s_step, 3),
            sample_batch_size=sample_batch,
            sample_step_s=round(s_step, 4),
            sample_step_all_s=[round(w, 4) for w in s_walls],
            sample_compile_s=round(sample_compile_s, 2),
            sample_gflops=round(sample_flops / s_step / 1e9, 1) if sample_flops else None,
            sample_contention=s_contention,
        )
    if sample_batch and chain:
        config.sampling.batch_size = config.sampling.num_samples = sample_batch
        sampler = evaluate.make_sample_fn(config, model, mesh)
        t0 = time.perf_counter()
        sampler(params, keys["sample"])
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = sampler(params, jax.random.fold_in(keys["sample"], 1))
        chain_s = time.perf_counter() - t0
        if not np.all(np.isfinite(samples)):
            raise FloatingPointError("the sampling chain produced non-finite values")
        if config.training.objective == "ncsn":
            method = "annealed_langevin"
            chain_steps = config.ncsn.num_levels * config.ncsn.n_steps_each
        else:
            method = config.sampling.method
            chain_steps = config.sampling.num_steps or config.diffusion.num_timesteps
        out.update(
            chain_method=method,
            chain_steps=chain_steps,
            chain_batch_size=sample_batch,
            chain_s=round(chain_s, 3),
            chain_first_call_s=round(first_s, 3),
            chain_images_per_s=round(sample_batch / chain_s, 4),
        )
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    batch = _BATCH.value or config.training.batch_size
    sample_batch = 0 if _SKIP_SAMPLE.value else (_SAMPLE_BATCH.value or config.sampling.batch_size)
    runtime.configure_cpu_convolutions(config.cpu_conv_library)  # before JAX starts
    with config.unlocked():
        out = benchmark(config, batch, _STEPS.value, _WARMUP.value, sample_batch, _CHAIN.value)
    if _PEER_PYTHON.value:
        peer = {"train": _run_peer("train", batch, _STEPS.value)}
        out["train_vs_peer"] = round(out["train_images_per_s"] / peer["train"]["images_per_s"], 3)
        if sample_batch:
            peer["sample"] = _run_peer("sample", sample_batch, _STEPS.value)
            out["sample_vs_peer"] = round(
                out["sample_images_per_s"] / peer["sample"]["images_per_s"], 3
            )
        out["peer"] = peer
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    app.run(main)
