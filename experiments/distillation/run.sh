#!/usr/bin/env bash
# Issue 42's measurements, alone on the machine, from the repository root (docs/distillation.md).
# 1. The teachers: the digits default (the README's first command) and its v-prediction twin.
# 2. Their distillations (each round's seconds in WORKDIR/log.INFO and students/<N>/meta).
# 3. 1,000 samples of each sampler, judged by one classifier (runs/digits_judge) against the
#    training digits; the teacher's rows of the chain and DPM-Solver++ were first drawn at the
#    commit before the distillation (results/teacher_d8bd61a) and are read from its cache.
set -euo pipefail
python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits_teacher
python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits_v_teacher \
    --config.diffusion.mean_type=v
python -m diffusion_jax.main --config configs/digits_distill.py:runs/digits_teacher \
    --workdir runs/digits_distill_eps
python -m diffusion_jax.main --config configs/digits_distill.py:runs/digits_v_teacher \
    --workdir runs/digits_distill_v
out=experiments/distillation/results
python experiments/recipes/recipe_compare.py --runs teacher=runs/digits_teacher \
    student=runs/digits_distill_eps --samplers ancestral:0 distilled:64 distilled:8 distilled:4 \
    distilled:2 distilled:1 dpmpp_2m_sde:20 dpmpp_2m_sde:8 dpmpp_2m_sde:4 dpmpp_2m_sde:2 \
    dpmpp_2m_sde:1 --num_samples 1000 --references train --judge_dir runs/digits_judge \
    --plot calls --outdir "$out/eps_teacher"
python experiments/recipes/recipe_compare.py --runs v_teacher=runs/digits_v_teacher \
    v_student=runs/digits_distill_v --samplers distilled:64 distilled:8 distilled:4 \
    distilled:2 distilled:1 dpmpp_2m_sde:20 --num_samples 1000 --references train \
    --judge_dir runs/digits_judge --plot calls --outdir "$out/v_teacher"
