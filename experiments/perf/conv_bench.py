"""Throughput of formulations of the U-Net's convolutions on this machine, forward and
forward+backward, one JSON line per (formulation, shape).

    python experiments/perf/conv_bench.py                       # all formulations, the U-Net shapes
    python experiments/perf/conv_bench.py --batch 16 --forms xla,fast --rounds 5
    python experiments/perf/conv_bench.py --peer_python ~/peer-venv/bin/python   # + PyTorch rows

Formulations (all exact to float32 rounding; `check` in each line is the largest relative error of
the output and both gradients against ``lax.conv_general_dilated`` with autodiff):

  xla          lax.conv_general_dilated, gradients by JAX autodiff (XLA's transpose rules).
  fast         diffusion_jax.cpu.fast_conv.conv2d (custom VJP: see its docstring).
  im2col       concatenate the k*k shifted views along channels, one matmul; autodiff.
  taps         sum over the k*k taps of (shifted view @ kernel tap); autodiff.
  vjp_im2col   custom VJP: forward conv, input gradient as a forward conv with the flipped
               kernel, kernel gradient = im2col(x)^T @ dy (one matmul).
  vjp_taps     as vjp_im2col, kernel gradient as k*k matmuls (shifted view)^T @ dy.
  vjp_patches  as vjp_im2col with the patches from lax.conv_general_dilated_patches.
  vjp_swap     as vjp_im2col, kernel gradient as a convolution of dy by x with the roles of the
               two swapped (batch = output channels); opt-in (--forms), XLA:CPU does not offload
               it to YNNPACK and it is ~100x slower.
  winograd     diffusion_jax.cpu.winograd: F(4x4, 3x3) for every 3x3, stride-1 'SAME' shape
               with sizes in tiles of 4 (also those below the product's MIN_SIZE / MIN_CHANNELS),
               xla for the others. (An F(2x2, 3x3) tried before, its transforms fused in one
               pass, was 2-3x slower than xla forward.)
  torch        (with --peer_python) torch.nn.functional.conv2d, NCHW, as the PyTorch peer runs it.

GFLOP/s counts 2*N*HO*WO*KH*KW*C*O per forward, per input gradient (dx) and per kernel
gradient (dw), and 3x that per forward+backward. Timings are
medians over `rounds` rounds in which every formulation runs `reps` times in turn (interleaved, so
that the machine's load drifts over all of them alike); `best` is the fastest single call;
`cpu_gflops` divides by the process's CPU time instead of wall time, times the cores it may use
(less sensitive to other processes' load: the rate the formulation would reach with the machine to
itself, if it scaled perfectly). `other_cores` is the CPU used by other processes meanwhile.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.cpu import (  # noqa: E402
    fast_conv,
    runtime,  # noqa: E402
    winograd,
)

DN = fast_conv.DIMENSION_NUMBERS

# (name, H, C, O, k, stride) of the DDPM CIFAR-10 U-Net's convolutions (ch 128, mult 1,2,2,2).
SHAPES = [
    ("32x32 128->128", 32, 128, 128, 3, 1),
    ("16x16 256->256", 16, 256, 256, 3, 1),
    ("8x8 256->256", 8, 256, 256, 3, 1),
    ("4x4 256->256", 4, 256, 256, 3, 1),
    ("32x32 384->128", 32, 384, 128, 3, 1),
    ("32x32 256->256", 32, 256, 256, 3, 1),
    ("down 32->16 128", 32, 128, 128, 3, 2),
    ("down 16->8 256", 16, 256, 256, 3, 2),
    ("1x1 32x32 256->128", 32, 256, 128, 1, 1),
    ("conv_in 32x32 3->128", 32, 3, 128, 3, 1),
    ("conv_out 32x32 128->3", 32, 128, 3, 3, 1),
]


def xla_conv(x, w, s, pad):
    return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)


def _shifted_views(x, k, s, pad):
    """The k*k views x_pad[:, i + s*o, j + s*p, :], each [N, HO, WO, C], tap-major (i, j)."""
    pads = fast_conv.resolve_padding(pad, x.shape[1:3], (k, k), (s, s))
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho = (xp.shape[1] - k) // s + 1
    wo = (xp.shape[2] - k) // s + 1
    return [
        lax.slice(
            xp,
            (0, i, j, 0),
            (xp.shape[0], i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, xp.shape[3]),
            (1, s, s, 1),
        )
        for i in range(k)
        for j in range(k)
    ]


def im2col_conv(x, w, s, pad):
    k = w.shape[0]
    patches = jnp.concatenate(_shifted_views(x, k, s, pad), axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", patches, w.reshape(-1, w.shape[-1]))


def taps_conv(x, w, s, pad):
    k = w.shape[0]
    views = _shifted_views(x, k, s, pad)
    return sum(jnp.einsum("nhwc,co->nhwo", v, w[t // k, t % k]) for t, v in enumerate(views))


def _make_vjp(kernel_grad):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def conv(x, w, s, pad):
        return xla_conv(x, w, s, pad)

    def fwd(x, w, s, pad):
        return xla_conv(x, w, s, pad), (x, w)

    def bwd(s, pad, res, g):
        x, w = res
        dx = jax.vjp(lambda a: xla_conv(a, w, s, pad), x)[1](g)[0]
        return dx, kernel_grad(x, g, w.shape, s, pad)

    conv.defvjp(fwd, bwd)
    return conv


def _dw_im2col(x, g, wshape, s, pad):
    k = wshape[0]
    patches = jnp.concatenate(_shifted_views(x, k, s, pad), axis=-1)
    return jnp.einsum("nhwk,nhwo->ko", patches, g).reshape(wshape)


def _dw_taps(x, g, wshape, s, pad):
    k = wshape[0]
    views = _shifted_views(x, k, s, pad)
    return jnp.stack([jnp.einsum("nhwc,nhwo->co", v, g) for v in views]).reshape(wshape)


def _dw_patches(x, g, wshape, s, pad):
    k, _, c, o = wshape
    p = lax.conv_general_dilated_patches(x, (k, k), (s, s), pad, dimension_numbers=DN)
    return jnp.einsum("nhwk,nhwo->ko", p, g).reshape(c, k, k, o).transpose(1, 2, 0, 3)


def _dw_swap(x, g, wshape, s, pad):
    if s != 1 or wshape[:2] != (3, 3) or pad != "SAME":
        return jax.vjp(lambda b: xla_conv(x, b, s, pad), jnp.zeros(wshape, x.dtype))[1](g)[0]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # out[o, 2 - kh, 2 - kw, c] = sum_{n,h,w} dy[n, h, w, o] * xp[n, h + kh, w + kw, c]
    out = lax.conv_general_dilated(
        g, xp, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("CHWN", "IHWO", "NHWC")
    )
    return out[:, ::-1, ::-1, :].transpose(1, 2, 3, 0)


def winograd_conv(x, w, s, pad):
    if not winograd.applies(x.shape, w.shape, (s, s), pad, x.dtype, min_size=4, min_channels=1):
        return xla_conv(x, w, s, pad)
    return winograd.winograd_conv3x3(x, w)


FORMS = {
    "xla": xla_conv,
    "fast": lambda x, w, s, pad: fast_conv.conv2d(x, w, s, pad),
    "im2col": im2col_conv,
    "taps": taps_conv,
    "vjp_im2col": _make_vjp(_dw_im2col),
    "vjp_taps": _make_vjp(_dw_taps),
    "vjp_patches": _make_vjp(_dw_patches),
    "vjp_swap": _make_vjp(_dw_swap),
    "winograd": winograd_conv,
}
DEFAULT_FORMS = [f for f in FORMS if f != "vjp_swap"]


def _snapshot():
    """(wall s, this process's CPU s, machine's busy CPU s)."""
    with open("/proc/stat") as f:
        v = [int(a) for a in f.readline().split()[1:]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), time.process_time(), busy


def _max_rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def bench_shape(forms, shape, batch, rounds, reps, cores):
    name, h, c, o, k, s = shape
    pad = "SAME"
    x = jax.random.normal(jax.random.key(0), (batch, h, h, c), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (k, k, c, o), jnp.float32) / (k * c**0.5)
    ho = -(-h // s)
    flops = 2 * batch * ho * ho * k * k * c * o
    g = jax.random.normal(jax.random.key(2), (batch, ho, ho, o), jnp.float32)

    def grads(f):
        return jax.jit(lambda x, w, g: jax.vjp(lambda a, b: f(a, b, s, pad), x, w)[1](g))

    ref_y = jax.jit(lambda x, w: xla_conv(x, w, s, pad))(x, w)
    ref_g = grads(xla_conv)(x, w, g)
    fns, checks = {}, {}
    for f_name in forms:
        f = FORMS[f_name]
        fwd = jax.jit(lambda x, w, g, f=f: f(x, w, s, pad))
        # forward + backward: the loss 0.5*|y|^2 has dy = y, so nothing but the conv runs.
        fb = jax.jit(
            jax.grad(lambda x, w, g, f=f: 0.5 * jnp.sum(jnp.square(f(x, w, s, pad))), (0, 1))
        )
        y, gx = fwd(x, w, g), grads(f)(x, w, g)
        errs = [_max_rel_err(u, v) for u, v in zip((y, *gx), (ref_y, *ref_g), strict=True)]
        checks[f_name] = max(errs)
        dx = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda a: f(a, w, s, pad), x)[1](g)[0])
        dw = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda b: f(x, b, s, pad), w)[1](g)[0])
        fns[f_name] = (fwd, fb, dx, dw)
        for fn in fns[f_name]:
            jax.block_until_ready(fn(x, w, g))
    times = {(f_name, p): [] for f_name in forms for p in range(4)}
    cpu = {key: 0.0 for key in times}
    start = _snapshot()
    for _ in range(rounds):
        for f_name in forms:
            for p in range(4):
                fn = fns[f_name][p]
                for _ in range(reps):
                    c0, t0 = time.process_time(), time.perf_counter()
                    jax.block_until_ready(fn(x, w, g))
                    times[(f_name, p)].append(time.perf_counter() - t0)
                    cpu[(f_name, p)] += time.process_time() - c0
    end = _snapshot()
    other = max((end[2] - start[2]) - (end[1] - start[1]), 0.0) / (end[0] - start[0])
    lines = []
    for f_name in forms:
        row = dict(form=f_name, shape=name, batch=batch, k=k, stride=s, gflop_fwd=flops / 1e9)
        for p, tag, mult in ((0, "fwd", 1), (1, "fwd_bwd", 3), (2, "dx", 1), (3, "dw", 1)):
            ts = times[(f_name, p)]
            row[f"{tag}_gflops"] = round(mult * flops / statistics.median(ts) / 1e9, 1)
            row[f"{tag}_best_gflops"] = round(mult * flops / min(ts) / 1e9, 1)
            row[f"{tag}_cpu_gflops"] = round(
                mult * flops * len(ts) * cores / cpu[(f_name, p)] / 1e9, 1
            )
            row[f"{tag}_ms"] = round(1e3 * statistics.median(ts), 2)
        row["check"] = float(f"{checks[f_name]:.1e}")
        row["other_cores"] = round(other, 2)
        lines.append(row)
    return lines


_TORCH_SCRIPT = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
batch, rounds, reps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for name, h, c, o, k, s in json.loads(sys.argv[5]):
    x = torch.randn(batch, c, h, h, requires_grad=True)
    conv = torch.nn.Conv2d(c, o, k, s, padding=(k // 2 if s == 1 else 0), bias=False)
    def fwd():
        with torch.no_grad():
            xin = x if s == 1 else torch.nn.functional.pad(x, (0, 1, 0, 1))
            return conv(xin)
    def fb():
        xin = x if s == 1 else torch.nn.functional.pad(x, (0, 1, 0, 1))
        y = conv(xin)
        (0.5 * y.square().sum()).backward()
        x.grad = None; conv.weight.grad = None
    ho = -(-h // s)
    flops = 2 * batch * ho * ho * k * k * c * o
    for f in (fwd, fb): f(); f()
    ts = {0: [], 1: []}
    for _ in range(rounds):
        for p, f in ((0, fwd), (1, fb)):
            for _ in range(reps):
                t0 = time.perf_counter(); f(); ts[p].append(time.perf_counter() - t0)
    row = dict(form="torch", shape=name, batch=batch, k=k, stride=s, gflop_fwd=flops / 1e9)
    for p, tag, mult in ((0, "fwd", 1), (1, "fwd_bwd", 3)):
        row[tag + "_gflops"] = round(mult * flops / statistics.median(ts[p]) / 1e9, 1)
        row[tag + "_best_gflops"] = round(mult * flops / min(ts[p]) / 1e9, 1)
        row[tag + "_ms"] = round(1e3 * statistics.median(ts[p]), 2)
    print(json.dumps(row), flush=True)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--forms", default=",".join(DEFAULT_FORMS), help="comma-separated, from: " + ",".join(FORMS)
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peer_python", default="", help="a python with torch: adds 'torch' rows")
    args = p.parse_args()
    runtime.configure_allocator()  # as main and the benchmark run (docs/performance.md)
    forms = [f for f in args.forms.split(",") if f]
    unknown = set(forms) - set(FORMS)
    if unknown:
        p.error(f"unknown formulations {sorted(unknown)}; known: {list(FORMS)}")
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    cores = len(os.sched_getaffinity(0))
    for shape in shapes:
        for row in bench_shape(forms, shape, args.batch, args.rounds, args.reps, cores):
            print(json.dumps(row), flush=True)
        if args.peer_python:
            out = subprocess.run(
                [
                    args.peer_python,
                    "-c",
                    _TORCH_SCRIPT,
                    str(cores),
                    str(args.batch),
                    str(args.rounds),
                    str(args.reps),
                    json.dumps([shape]),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
