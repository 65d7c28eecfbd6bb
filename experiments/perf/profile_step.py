"""Where the time of one train step goes: a jax.profiler trace of the compiled step, its XLA:CPU
operations summed by kind. Prints a table and one JSON line.

    python experiments/perf/profile_step.py --config configs/cifar10_ddpm.py --batch_size 16

Kinds are read from the compiled HLO: convolutions (forward, input gradient, kernel gradient, by
their dimension labels), dots, transposes/copies, YNNPACK fusions of other ops, and the remaining
elementwise/reduction fusions (forward or backward, by the op name XLA keeps from JAX), and
cpu/winograd.py's products and transforms (its "winograd" name scope). Each operation's trace
event spans its run on the thread that issued it; an operation that uses both cores (a YNNPACK
call, a parallel loop) counts once, so the sum over kinds is close to the step's wall time, not
its CPU time. Eigen's convolutions run asynchronously on the intra-op pool and their events end
before their work does: what they take is ``untraced_ms``, the step's wall time minus the traced
sum (``--cpu_conv_library eigen``, the default).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile
import time


def _kind(line: str, body: str) -> str:
    op_name = re.search(r'op_name="([^"]+)"', line)
    backward = op_name is not None and "transpose(" in op_name.group(1)
    if op_name is not None and "winograd" in op_name.group(1):  # cpu/winograd.py's scope
        if " dot(" in body or " dot(" in line:
            return "winograd products"
        return "winograd transforms"
    if " convolution(" in body or " convolution(" in line:
        labels = re.search(r"dim_labels=(\S+?),", body + line)
        labels = labels.group(1) if labels else ""
        if labels.startswith("f01b") or labels.endswith("->01bf") or "01io->" not in labels:
            return "conv kernel grad"
        return "conv input grad" if backward else "conv forward"
    if " dot(" in body or " dot(" in line:
        return "dot"
    if "transpose" in line.split("=")[0] or "copy" in line.split("=")[0]:
        return "transpose/copy"
    if '"__ynn_fusion"' in line:
        return "ynn fusion (other)"
    return "elementwise/reduce " + ("backward" if backward else "forward/optimizer")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cifar10_ddpm.py")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cpu_conv_library", default="eigen")
    p.add_argument("--conv_impl", default="", help="config.model.conv_impl (default: the config's)")
    p.add_argument("--dtype", default="", help="config.model.dtype (default: the config's)")
    args = p.parse_args()

    from diffusion_jax.cpu import runtime

    runtime.configure_cpu_convolutions(args.cpu_conv_library)
    malloc_tuned = runtime.configure_allocator()
    import importlib.util

    import jax
    import numpy as np
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from diffusion_jax import benchmark

    spec = importlib.util.spec_from_file_location("cfg", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if args.conv_impl:
        config.model.conv_impl = args.conv_impl
    if args.dtype:
        config.model.dtype = args.dtype
    built = benchmark.compile_train_step(config, args.batch_size)
    compiled, state, batch, keys = built["compiled"], built["state"], built["batch"], built["keys"]
    hlo = compiled.as_text()
    for _ in range(2):
        state, metrics = compiled(state, batch, keys["train"])
        jax.block_until_ready(metrics)

    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    walls, cpus = [], []
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            c0, t0 = time.process_time(), time.perf_counter()
            state, metrics = compiled(state, batch, keys["train"])
            jax.block_until_ready(metrics)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)

    lines = {}
    for text in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", text)
        if m:
            lines[m.group(1)] = text
    bodies = {block.split()[0].lstrip("%"): block for block in re.split(r"\n(?=\S)", hlo)}
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    per_kind = collections.Counter()
    threads = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id)
                if name in lines:
                    callee = re.search(r"calls=%([\w.\-]+)", lines[name])
                    body = bodies.get(callee.group(1), "") if callee else ""
                    per_kind[_kind(lines[name], body)] += event.duration_ps / 1e9 / args.steps
                    threads[line.name] += event.duration_ps / 1e9 / args.steps

    cpu_ms = 1e3 * float(np.median(cpus))
    out = dict(
        config=args.config,
        batch_size=args.batch_size,
        cpu_conv_library=args.cpu_conv_library,
        conv_impl=built["config"].model.conv_impl,
        malloc_tuned=malloc_tuned,
        step_wall_ms=round(1e3 * float(np.median(walls)), 1),
        step_cpu_ms=round(cpu_ms, 1),
        traced_ms={k: round(v, 1) for k, v in per_kind.most_common()},
    )
    wall_ms = out["step_wall_ms"]
    out["untraced_ms"] = round(wall_ms - sum(per_kind.values()), 1)
    out["traced_by_thread_ms"] = {k: round(v, 1) for k, v in threads.items()}
    print(f"step: {wall_ms} ms wall, {out['step_cpu_ms']} ms CPU")
    for kind, ms in [
        *per_kind.most_common(),
        ("untraced (Eigen's convolutions)", out["untraced_ms"]),
    ]:
        print(f"  {ms:8.1f} ms  {100 * ms / wall_ms:5.1f} % of the wall time  {kind}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
