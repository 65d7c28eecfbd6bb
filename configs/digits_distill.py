"""Progressive distillation (Salimans & Ho 2022) of a digits run: its DDIM sampler of 64 steps
distilled, halving the steps each round, into students of 32, 16, 8, 4, 2 and 1.

    python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits_v \
        --config.diffusion.mean_type=v
    python -m diffusion_jax.main --config configs/digits_distill.py:runs/digits_v \
        --workdir runs/digits_distill
    python -m diffusion_jax.main --config configs/digits_distill.py:runs/digits_v \
        --workdir runs/digits_distill --mode sample --config.sampling.num_steps=8

The argument is the teacher's workdir: its network, data and schedule are read from its
config.json (the digits default's when it holds none yet), so a run of any earlier recipe
distils. The student predicts v (eps would be amplified ~156x at the first step) with no learned
variance, and starts from the teacher's weights; each round is 800 Adam updates of batch 64,
the learning rate falling linearly from 5e-4 to 0. ``--mode sample|eval`` read the student of
``sampling.num_steps`` (4 by default); the bound has no meaning for it, its samples are judged by
the classifier metrics.

Expected (experiments/distillation/README.md, 1,000 samples against the training digits): the
six rounds in about 820 s on a 2-core CPU (1.6x the teacher's training); from the v teacher
above, FD 14.93 at 8 calls, 18.74 at 4, 29.58 at 1 (the chain 8.18, the teacher's 64-step DDIM
12.41, DPM-Solver++ SDE at 4 calls 304.88). The README's eps run (runs/digits) distils too, with
poorer students (FD 29.77 at 4 calls): its eps head, read as v, is wrong at high noise.
"""

import os

from configs import digits
from configs import workdir as workdir_config
from diffusion_jax import config as config_lib


def get_config(teacher: str = "runs/digits"):
    if os.path.exists(os.path.join(teacher, "config.json")):
        # Keys added since the teacher was written (this section among them) at their defaults.
        config = config_lib.with_defaults(workdir_config.get_config(teacher))
    else:
        config = digits.get_config()
    config.training.objective = "distill"
    # The student: v-prediction, fixed variance (the teacher's loss-aware hybrid objective does
    # not apply to it; these keys only keep the config consistent).
    config.diffusion.mean_type = "v"
    config.diffusion.var_type = "fixedlarge"
    config.diffusion.loss_type = "simple"
    config.diffusion.t_sampler = "uniform"

    config.distill.teacher = teacher
    config.distill.start_steps = 64
    config.distill.target_steps = 1
    config.distill.steps_per_round = 800
    config.distill.learning_rate = 5e-4
    config.distill.weight = "snr_plus_one"
    config.distill.init = "teacher"

    config.training.batch_size = 64
    config.training.log_every = 100
    config.training.checkpoint_every = 500

    config.sampling.method = "distilled"
    config.sampling.num_steps = 4
    config.sampling.num_samples = 64
    # A student has no likelihood bound: its samples are judged by a classifier trained on the
    # digits' labels (eval/classifier), against the training digits.
    config.eval.metrics = (
        "fd_classifier",
        "kid_classifier",
        "is_classifier",
        "precision_recall_classifier",
    )
    config.eval.figures = ()
    config.eval.classifier.split = "train"
    return config
