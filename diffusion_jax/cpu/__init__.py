"""What makes the networks fast on a CPU, apart from the networks and the maths:
``fast_conv`` (a convolution with a hand-written VJP), ``winograd`` (F(4x4, 3x3) for 3x3
convolutions, ``model.conv_impl``) and ``runtime`` (XLA:CPU's convolution library and the
allocator, chosen per process). Measurements: experiments/perf/README.md."""
