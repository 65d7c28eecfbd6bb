"""The public API that ``../shared/DESIGN.md`` ("Public API") lists as stable: every name imports
from the module DESIGN names and is callable, each module's ``__all__`` (where it has one) holds
those names and only names that exist, and the parameters DESIGN writes out are still there.

DESIGN.md lives outside the repository (CI cannot read it), so its list is copied here by hand:
a change to DESIGN's "Public API" section is a change to ``PUBLIC_API`` and ``SIGNATURES``."""

import importlib
import inspect

import numpy as np
import pytest

pytestmark = pytest.mark.smoke

# module -> the names DESIGN's "Public API" lists for it.
PUBLIC_API = {
    "diffusion_jax.schedules": ("get_beta_schedule",),
    "diffusion_jax.diffusion": (
        "GaussianDiffusion",
        "q_mean_variance",
        "q_sample",
        "q_posterior_mean_variance",
        "p_mean_variance",
        "training_losses",
        "vb_terms_bpd",
        "prior_bpd",
        "calc_bpd_loop",
        "p_sample",
        "p_sample_loop",
        "ddim_sample_loop",
        "score_from_eps",
        "eps_from_score",
    ),
    "diffusion_jax.likelihood": ("normal_kl", "discretized_gaussian_log_likelihood"),
    "diffusion_jax.score": ("ism_loss", "ssm_loss", "dsm_loss", "ncsn_sigmas", "annealed_langevin"),
    "diffusion_jax.models": ("get_model",),
    "diffusion_jax.checkpoints": ("load_params",),
}

_NO_DEFAULT = object()

# (module, dotted name) -> DESIGN's parameters in order, each a name or (name, default); a
# function may take more parameters after these. `**kw` is written "**kw".
SIGNATURES = {
    ("diffusion_jax.schedules", "get_beta_schedule"): ("name", "num_timesteps", "**kw"),
    ("diffusion_jax.diffusion", "GaussianDiffusion.create"): (
        "betas",
        ("mean_type", "eps"),
        ("var_type", "fixedlarge"),
    ),
    ("diffusion_jax.diffusion", "q_mean_variance"): ("d", "x0", "t"),
    ("diffusion_jax.diffusion", "q_sample"): ("d", "x0", "t", "noise"),
    ("diffusion_jax.diffusion", "q_posterior_mean_variance"): ("d", "x0", "x_t", "t"),
    ("diffusion_jax.diffusion", "p_mean_variance"): (
        "d",
        "model_fn",
        "x_t",
        "t",
        ("clip_denoised", True),
    ),
    ("diffusion_jax.diffusion", "training_losses"): (
        "d",
        "model_fn",
        "x0",
        "key",
        ("loss_type", "simple"),
    ),
    ("diffusion_jax.diffusion", "vb_terms_bpd"): ("d", "model_fn", "x0", "x_t", "t"),
    ("diffusion_jax.diffusion", "prior_bpd"): ("d", "x0"),
    ("diffusion_jax.diffusion", "calc_bpd_loop"): ("d", "model_fn", "x0", "key"),
    ("diffusion_jax.diffusion", "p_sample"): ("d", "model_fn", "x_t", "t", "key"),
    ("diffusion_jax.diffusion", "p_sample_loop"): (
        "d",
        "model_fn",
        "shape",
        "key",
        ("x_T", None),
    ),
    ("diffusion_jax.diffusion", "ddim_sample_loop"): (
        "d",
        "model_fn",
        "shape",
        "key",
        "num_steps",
        ("eta", 0.0),
        ("x_T", None),
    ),
    ("diffusion_jax.diffusion", "score_from_eps"): ("d", "eps", "t"),
    ("diffusion_jax.diffusion", "eps_from_score"): ("d", "score", "t"),
    ("diffusion_jax.likelihood", "normal_kl"): ("mean1", "logvar1", "mean2", "logvar2"),
    ("diffusion_jax.likelihood", "discretized_gaussian_log_likelihood"): (
        "x",
        "mean",
        "log_scale",
        ("num_bins", 256),
    ),
    ("diffusion_jax.score", "ism_loss"): ("score_fn", "x"),
    ("diffusion_jax.score", "ssm_loss"): (
        "score_fn",
        "x",
        "key",
        ("num_projections", 1),
        ("projection", "rademacher"),
    ),
    ("diffusion_jax.score", "dsm_loss"): ("score_fn", "x", "sigma", "key"),
    ("diffusion_jax.score", "ncsn_sigmas"): ("sigma_max", "sigma_min", "num_levels"),
    ("diffusion_jax.score", "annealed_langevin"): (
        "score_fn",
        "x_init",
        "sigmas",
        "key",
        "n_steps_each",
        "step_lr",
    ),
    ("diffusion_jax.models", "get_model"): ("config",),
    ("diffusion_jax.checkpoints", "load_params"): (
        "workdir",
        ("step", None),
        ("ema", True),
    ),
}


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module,name", [(m, n) for m, names in PUBLIC_API.items() for n in names])
def test_design_name_imports_and_is_callable(module, name):
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"DESIGN lists {module}.{name}, which does not import"
    obj = getattr(mod, name)
    assert callable(obj), f"{module}.{name} is not callable: {obj!r}"


# The maths core: each module lists its public names (DESIGN: "Public names of the maths modules
# listed in each module's __all__").
MATH_CORE = tuple(
    f"diffusion_jax.{m}"
    for m in (
        "schedules",
        "likelihood",
        "timesteps",
        "samplers",
        "discrete.process",
        "discrete.bound",
        "discrete.losses",
        "discrete.chain",
        "diffusion",
        "vdm",
        "ode",
        "score",
    )
)


@pytest.mark.parametrize("module", MATH_CORE)
def test_all_holds_design_names_and_only_existing_ones(module):
    mod = importlib.import_module(module)
    assert hasattr(mod, "__all__"), f"{module} defines no __all__"
    exported = list(mod.__all__)
    assert len(exported) == len(set(exported)), f"{module}.__all__ repeats a name: {exported}"
    missing = [n for n in PUBLIC_API.get(module, ()) if n not in exported]
    assert not missing, f"{module}.__all__ lacks DESIGN's {missing}"
    absent = [n for n in exported if not hasattr(mod, n)]
    assert not absent, f"{module}.__all__ names {absent}, which the module does not define"


def test_signatures_keep_designs_parameters():
    """DESIGN's parameters, in DESIGN's order and with its defaults, lead each signature."""
    for (module, dotted), expected in SIGNATURES.items():
        params = list(inspect.signature(_resolve(module, dotted)).parameters.values())
        where = f"{module}.{dotted}{inspect.signature(_resolve(module, dotted))}"
        assert len(params) >= len(expected), f"{where}: DESIGN lists {expected}"
        for param, want in zip(params, expected, strict=False):
            if want == "**kw":
                assert param.kind is inspect.Parameter.VAR_KEYWORD, f"{where}: no **kw"
                continue
            name, default = want if isinstance(want, tuple) else (want, _NO_DEFAULT)
            assert param.name == name, (
                f"{where}: parameter {param.name!r} where DESIGN has {name!r}"
            )
            if default is not _NO_DEFAULT:
                assert param.default == default, (
                    f"{where}: {name}={param.default!r}, DESIGN {default!r}"
                )


def test_gaussian_diffusion_create():
    from diffusion_jax import diffusion, schedules

    assert callable(getattr(diffusion.GaussianDiffusion, "create", None))
    betas = schedules.get_beta_schedule("linear", 10)
    d = diffusion.GaussianDiffusion.create(betas, mean_type="eps", var_type="fixedlarge")
    assert isinstance(d, diffusion.GaussianDiffusion)


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic", "const"])
def test_get_beta_schedule_accepts_designs_names(name):
    from diffusion_jax.schedules import get_beta_schedule

    betas = get_beta_schedule(name, 100)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64
    assert betas.shape == (100,)
    assert np.all((betas > 0) & (betas < 1))
    if name == "linear":  # DESIGN: 1e-4 ... 0.02
        np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02])
