"""The base config: every key and its default, the values of DDPM (Ho et al. 2020) on CIFAR-10
(its U-Net, T = 1000 linear betas, Adam 2e-4, batch 128, EMA 0.9999), but no data set: every
recipe under configs/ imports this one, names its data and changes only what differs
(``configs/cifar10_ddpm.py`` is the paper's run). Any key can be overridden on the command line,
e.g. ``--config.training.batch_size=64``.

``RENAMED`` maps each key an earlier version wrote to where it lives now (None: removed);
``migrate`` moves them in a run's old ``config.json``, and the command line refuses an old name in
one line naming the new one.
"""

from __future__ import annotations

import copy
import json

import ml_collections

_EVAL_GROUPS = {  # evaluator (or shared network) -> the flat eval.<prefix>KEY names it took over
    "rate_distortion": ("rd_", ("num_examples",)),
    "progressive": ("progressive_", ("num_samples", "num_frames")),
    "bpd_ode": ("ode_", ("num_examples", "rtol", "atol")),
    "classifier": (
        "classifier_",
        (
            "num_samples",
            "split",
            "train_steps",
            "batch_size",
            "learning_rate",
            "width",
            "feature_dim",
            "num_bootstrap",
        ),
    ),
}
RENAMED: dict[str, str | None] = {
    "cpu_conv_library": None,  # the process's choice: --cpu_conv_library (cpu/runtime.py)
    **{
        f"eval.{prefix}{key}": f"eval.{group}.{key}"
        for group, (prefix, keys) in _EVAL_GROUPS.items()
        for key in keys
    },
    "eval.inception_weights": "eval.inception.weights",
    "eval.inception_sha256": "eval.inception.sha256",
    **{
        f"eval.fid_{key}": f"eval.inception.{key}"
        for key in ("num_samples", "reference_split", "reference_num_examples", "batch_size")
    },
    "eval.fid_chunk_size": "eval.inception.chunk_size",
    "eval.is_num_splits": "eval.inception.is_num_splits",
}


def migrate(config: dict) -> dict:
    """A copy of a run's saved config (a dict, as ``config.json`` holds it) with every key of
    ``RENAMED`` it holds moved to its new place (a removed one dropped)."""
    out = copy.deepcopy(config)
    for old, new in RENAMED.items():
        *path, leaf = old.split(".")
        parent = out
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or leaf not in parent:
            continue
        value = parent.pop(leaf)
        if new is not None:
            *path, leaf = new.split(".")
            target = out
            for part in path:
                target = target.setdefault(part, {})
            target.setdefault(leaf, value)
    return out


def read_run_config(path: str) -> dict:
    """A run's saved ``config.json`` (``path``), migrated (``migrate``); ValueError naming the
    file when it cannot be read or is not a JSON object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise ValueError(
            f"{path} cannot be read as a run's config ({type(e).__name__}: {cause}): restore it "
            "from a copy, or start the run in another --workdir."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a run's config.")
    return migrate(value)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: images live in [-1, 1]; level k of `num_bins` maps to 2k/(num_bins-1) - 1.
    config.data = ml_collections.ConfigDict()
    # tfds name | digits | toy name | path to a folder or .npz: every recipe names its own.
    config.data.dataset = ""
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 32  # 0 for vector (toy) data
    config.data.num_channels = 3  # image channels, or the dimension of vector data
    config.data.num_bins = 256  # grey levels of the discrete data (for bits/dim)
    config.data.random_flip = True
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
    # fashion_mnist / mnist without a prepared tfds copy: the folder of their four IDX files
    # ("" = /usr/share/datasets/fashion-mnist for fashion_mnist, from Debian's
    # dataset-fashion-mnist package; mnist has no default).
    config.data.idx_dir = ""
    # How a tfds name is read: "load" (tfds.load through TensorFlow, the split decoded whole into
    # memory) | "data_source" (tfds.data_source: random access to a set prepared with `tfds build
    # NAME --file_format=array_record`, decoded as batches ask; no TensorFlow).
    config.data.tfds_reader = "load"
    config.data.toy_size = 0  # >0: a fixed toy set of that many points; 0: fresh samples each step
    # Batches assembled ahead of the step (Grain worker threads): -1 = half the host's cores
    # (at least 1); 0 = in the training thread. The batches are the same whatever the values.
    config.data.num_workers = -1
    config.data.prefetch_batches = 2  # batches ready ahead on the host (and 1 on the devices)

    # Model: picked by name (diffusion_jax.models.get_model).
    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"  # unet | mlp
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.resamp_with_conv = True
    config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    config.model.remat = False  # rematerialise ResNet blocks (saves memory on big models)
    # models.layers.CONV_IMPLS: "xla" | "fast" | "winograd"; "auto" = "winograd" on CPU, "xla" on
    # GPU/TPU, resolved when a run starts and recorded so in its config.json.
    config.model.conv_impl = "auto"
    # Fourier features of x_t as extra input channels: exponents n of sin/cos(2^n pi x_t) (VDM).
    # () = none. For L grey levels, 2^n = L - 1 (or a multiple) is periodic in the grid
    # (models.layers.fourier_features).
    config.model.fourier_features = ()
    # True: the frequencies are 2^n (L - 1) pi, L = data.num_bins, so n = 0 has one period per
    # grey level for any L (for 256 levels no 2^n is a multiple of 255). False: 2^n pi.
    config.model.fourier_grid = False
    # > 0: a class-conditional model of that many classes (an embedding added to the time
    # embedding, plus a "no class" entry); 0: unconditional. Needs a labelled data set.
    config.model.num_classes = 0
    # GroupNorm groups of the U-Net (gcd(norm_groups, C) for C not a multiple): the paper's 32.
    config.model.norm_groups = 32
    config.model.hidden_dim = 256  # mlp only
    config.model.num_layers = 4  # mlp only: residual blocks

    # Diffusion process and objective.
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.beta_schedule = "linear"  # linear | cosine | quadratic | const
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.02
    config.diffusion.num_timesteps = 1000
    config.diffusion.mean_type = "eps"  # eps | x0 | v
    config.diffusion.var_type = "fixedlarge"  # fixedlarge | fixedsmall | learned_range
    config.diffusion.loss_type = "simple"  # simple | vlb | hybrid | kl
    # How training draws t (ddpm objective): uniform, or loss_aware (Improved DDPM 3.3:
    # p_t ~ sqrt(E[loss_t^2]) over the last 10 losses of each t, kept in the train state; the
    # loss reweighted by 1/(T p_t)).
    # loss_aware_vb (loss_type hybrid): the importance-sampled t drives only the vb term, the mse
    # term keeps a uniform t of its own (two network calls per example, in one batch).
    config.diffusion.t_sampler = "uniform"
    # The mse term's weight over t: none (L_simple) | min_snr (Hang et al. 2023: min(SNR, gamma)
    # on the x0-error).
    config.diffusion.mse_weighting = "none"
    config.diffusion.min_snr_gamma = 5.0
    config.diffusion.hybrid_lambda = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb
    config.diffusion.hybrid_train_mean = False  # hybrid: the vb term also trains the mean

    # Optimiser (optax): Adam with linear warmup and global-norm clipping; EMA of the parameters.
    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adam"  # adam | adamw
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    # After the warm-up: "constant", or "cosine" down to 0 at training.num_train_steps.
    config.optim.lr_decay = "constant"
    config.optim.beta1 = 0.9
    config.optim.beta2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0  # global norm; 0 disables
    config.optim.ema_decay = 0.9999
    # EMA warm-up (k-diffusion, diffusers): the decay at step n is min(ema_decay, 1 - (1 + n)^-p),
    # so the average forgets the random initial weights; 0: the constant ema_decay.
    config.optim.ema_warmup_power = 0.0

    config.training = ml_collections.ConfigDict()
    config.training.objective = "ddpm"  # ddpm | ncsn | vdm | distill (configs/digits_distill.py)
    config.training.batch_size = 128  # global: over all devices and hosts
    config.training.num_train_steps = 800_000
    config.training.log_every = 100
    config.training.checkpoint_every = 5000
    config.training.sample_every = 50_000  # 0 disables periodic sample grids
    config.training.keep_checkpoints = 3
    config.training.eval_at_end = True  # final sample grid and eval metrics after training
    # Classifier-free guidance's training (model.num_classes > 0): each label replaced by "no
    # class" with this probability, so one network is also the unconditional model.
    config.training.label_dropout = 0.0

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.num_examples = 10_000  # 0: the whole split
    config.eval.batch_size = 256
    # The bound's x0_hat clipped to [-1, 1] in the mean of p(x_{t-1} | x_t), as in Ho et al.'s
    # evaluation (False: the unclipped mean, what runs before this key was added reported).
    config.eval.clip_denoised = True
    # The bound's sum of L_t (bpd, bpd_splits): 0 = every t (T network calls per example, and the
    # per-t curves); K > 0 = an unbiased estimate from K timesteps per example (K + 1 calls; L_0
    # and L_T exact), its standard error counting both examples and t. bound_t_sampler: how they
    # are drawn: "stratified" (one in each of K strata of t, growing geometrically with t:
    # timesteps.stratum_edges) | "importance" (the run's
    # loss-aware distribution over t, reweighted; diffusion.t_sampler loss_aware* runs only).
    config.eval.bound_num_t = 0
    config.eval.bound_t_sampler = "stratified"
    # evaluation.EVALUATORS of kind "metric": bpd | bpd_ode | fid | is | fd_classifier |
    # is_classifier | class_match (conditional models: share of samples of the requested class)
    config.eval.metrics = ("bpd",)
    config.eval.figures = ("lt_curve", "rate_distortion", "progressive")
    config.eval.bpd_splits = ()  # more splits for bits/dim besides eval.split, e.g. ("train",)
    config.eval.bpd_splits_num_examples = -1  # -1: eval.num_examples; 0: the whole split
    # Each evaluator's own keys under its name.
    config.eval.rate_distortion = ml_collections.ConfigDict()
    config.eval.rate_distortion.num_examples = 256  # examples of eval.split; 0: all
    config.eval.progressive = ml_collections.ConfigDict()
    config.eval.progressive.num_samples = 8
    config.eval.progressive.num_frames = 10
    # fid and is: Inception-v3 weights as .npz or .safetensors (never a pickle), verified against
    # the pinned SHA-256 before use; without them FID/IS are skipped with a message, never
    # invented. One set of num_samples samples serves both.
    config.eval.inception = ml_collections.ConfigDict()
    config.eval.inception.weights = ""  # path or http(s)/file URL
    config.eval.inception.sha256 = ""
    config.eval.inception.num_samples = 50_000
    config.eval.inception.reference_split = "train"
    config.eval.inception.reference_num_examples = 0  # 0: the whole split
    config.eval.inception.batch_size = 200  # a multiple of the device count
    config.eval.inception.chunk_size = 1000
    config.eval.inception.is_num_splits = 10
    # bpd_ode: bits/dim by the probability-flow ODE (Dopri5, Hutchinson trace, uniform
    # dequantization) on the first num_examples of eval.split (0: all).
    config.eval.bpd_ode = ml_collections.ConfigDict()
    config.eval.bpd_ode.num_examples = 1000
    config.eval.bpd_ode.rtol = 1e-5
    config.eval.bpd_ode.atol = 1e-5
    # Offline sample quality (fd_classifier, is_classifier, kid_classifier,
    # precision_recall_classifier, class_match; labelled image data only): a small CNN trained on
    # the training split's labels, cached in WORKDIR/eval/classifier, judges num_samples samples
    # of the config's sampler against split.
    config.eval.classifier = ml_collections.ConfigDict()
    config.eval.classifier.num_samples = 1000
    config.eval.classifier.split = ""  # the reference split; "" = eval.split
    config.eval.classifier.train_steps = 1000
    config.eval.classifier.batch_size = 128
    config.eval.classifier.learning_rate = 2e-3  # Adam, cosine-decayed to 0
    config.eval.classifier.width = 32  # channels of the first stage (x2, x4 after each pooling)
    config.eval.classifier.feature_dim = 64  # penultimate features: the Frechet distance's space
    config.eval.classifier.num_bootstrap = 50  # resamplings of the samples for the stderr

    config.sampling = ml_collections.ConfigDict()
    # sampling.SAMPLERS: ancestral | ddim | dpmpp_2m | dpmpp_2m_sde | heun (ddpm and vdm: for vdm
    # on the uniform grid in t); distilled (DDIM on the grid a distilled student was trained for:
    # num_steps uniform in t, ending at sigma = 0; ddpm teachers and distill students);
    # langevin (ncsn). vdm_ancestral | vdm_ddim | vdm_dpmpp_2m: aliases
    config.sampling.method = "ancestral"
    config.sampling.num_steps = 0  # network calls; 0: all T. Fewer respaces ancestral/DDIM
    config.sampling.eta = 0.0  # ddim only
    # dpmpp_2m_sde only: its noise scale (k-diffusion's eta; 1 = the reverse SDE, 0 = the ODE).
    config.sampling.sde_eta = 1.0
    # dpmpp_2m / dpmpp_2m_sde: the step into t = 0 first order when there are fewer than 10
    # steps (the official DPM-Solver++'s lower_order_final); False: second order throughout.
    config.sampling.lower_order_final = False
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64
    config.sampling.clip_denoised = True
    # Class-conditional models: classifier-free guidance weight w (eps~ = (1 + w) eps(x, c) -
    # w eps(x, none); 0: the conditional model), and the class of every sample (-1: sample i
    # gets class i mod model.num_classes).
    config.sampling.guidance_scale = 0.0
    config.sampling.class_label = -1

    # Continuous-time diffusion (training.objective = "vdm"; Kingma et al. 2021): the bound
    # L_0 + 1/2 E_t[gamma'(t) |eps - eps_hat|^2] + L_1 with gamma(t) = log sigma^2/alpha^2.
    config.vdm = ml_collections.ConfigDict()
    config.vdm.gamma = "learned"  # learned (VDM's monotone network) | linear | cosine | beta_linear
    config.vdm.gamma_min = -13.3  # gamma(0); learned from here with learn_endpoints
    config.vdm.gamma_max = 5.0  # gamma(1)
    config.vdm.learn_endpoints = True  # learned schedule: train gamma(0), gamma(1) by the bound
    config.vdm.gamma_hidden = 1024  # units of the learned schedule's monotone network
    # How the learned schedule's shape trains: "elbo" (the loss's gradient; the bound does not
    # depend on the shape, so it only drifts) | "variance" (VDM section 4: the gradient of the
    # squared diffusion loss, minimising its variance over t).
    config.vdm.schedule_grad = "variance"
    config.vdm.t_sampler = "low_discrepancy"  # low_discrepancy | uniform
    config.vdm.t_per_example = 1  # times each example is diffused at per step (one batch of k B)
    # Kingma & Gao (2023) w(lambda) of the training diffusion term: elbo (1: the bound) |
    # sigmoid (sigmoid(bias - lambda)) | edm | min_snr (min(1, min_snr_gamma / SNR)). The
    # evaluated bound always has w = 1.
    config.vdm.weighting = "elbo"
    config.vdm.sigmoid_bias = 2.0
    config.vdm.min_snr_gamma = 5.0
    # Evaluation: the continuous bound, and the chain of eval_num_steps steps' bound beside it
    # (0: only the continuous one); eval.bound_num_t stratified t per image (0 counts as 1).
    config.vdm.eval_num_steps = 1000

    # Progressive distillation (training.objective = "distill"; Salimans & Ho 2022): a trained
    # ddpm run's DDIM sampler distilled, round by round, into a student of half the steps, which
    # predicts v (diffusion.mean_type) and has no learned variance (docs/distillation.md).
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ""  # the trained run's workdir (its newest EMA parameters)
    config.distill.start_steps = 1024  # the teacher's DDIM grid that the first round distils
    config.distill.target_steps = 1  # the last round's student: start_steps / 2^rounds
    config.distill.steps_per_round = 1000  # updates of each round, batch training.batch_size
    config.distill.learning_rate = 1e-4  # Adam (optim.*), linearly to 0 over each round
    # The x-space loss's weight: snr_plus_one (SNR + 1: the v-loss) | truncated_snr max(SNR, 1)
    config.distill.weight = "snr_plus_one"
    # The first student's weights: "teacher" (its network, the learned-variance channels of the
    # output dropped, the eps output read as v) | "random".
    config.distill.init = "teacher"

    # Score matching / NCSN (training.objective = "ncsn").
    config.ncsn = ml_collections.ConfigDict()
    config.ncsn.sigma_max = 1.0
    config.ncsn.sigma_min = 0.01
    config.ncsn.num_levels = 10
    config.ncsn.n_steps_each = 100
    config.ncsn.step_lr = 2e-5
    return config
