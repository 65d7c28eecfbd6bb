"""diffusers weights imported onto our U-Net: outputs equal to PyTorch's, errors that name things.

The fixtures under tests/data (``experiments/weights/make_diffusers_fixture.py``, run once in the
PyTorch peer's environment) hold small ``UNet2DModel``s with random weights in diffusers' files
and the PyTorch network's outputs on fixed inputs at t = 0, 1, 137.25 and 999. No torch here.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import xla_flags
from safetensors.numpy import save_file

from diffusion_jax import checkpoints, evaluation, import_weights, models, safe_arrays, train
from diffusion_jax.models import diffusers_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
TINY = os.path.join(DATA, "diffusers_tiny")
FLIP = os.path.join(DATA, "diffusers_tiny_flip_learned")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _outputs(workdir, config, ref):
    params = checkpoints.load_params(workdir)
    model = models.get_model(config)
    return np.asarray(model.apply({"params": params}, ref["x"], ref["t"]))


@pytest.mark.parametrize("fixture", [TINY, FLIP], ids=["ddpm_blocks", "flip_learned"])
def test_imported_network_matches_pytorch(fixture, tmp_path):
    ref = np.load(os.path.join(fixture, "reference.npz"))
    config = import_weights.import_diffusers(fixture, str(tmp_path / "run"))
    out = _outputs(str(tmp_path / "run"), config, ref)
    assert out.shape == ref["out"].shape
    scale = np.abs(ref["out"]).max()
    assert scale > 0.1  # a real output, not zeros
    assert np.abs(out - ref["out"]).max() <= 1e-5 * scale
    # The fixtures differ per example (t matters), so a wrong time embedding would show.
    assert np.abs(ref["out"][0] - ref["out"][3]).max() > 0.01


def test_config_and_scheduler_become_our_keys(tmp_path):
    config = import_weights.import_diffusers(FLIP, str(tmp_path / "run"))
    assert config.model.ch == 8 and tuple(config.model.ch_mult) == (1, 2)
    assert tuple(config.model.attn_resolutions) == (2,) and config.model.norm_groups == 8
    assert config.data.image_size == 4 and config.data.num_channels == 1
    assert config.diffusion.var_type == "learned_range"  # out_channels = 2 in_channels
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["model"]["ch"] == 8 and saved["diffusion"]["var_type"] == "learned_range"
    assert saved["model"]["conv_impl"] == "auto"  # the platform that runs it picks
    # A run's own config (configs/workdir.py) reads the import.
    from configs import workdir as workdir_config

    again = workdir_config.get_config(str(tmp_path / "run"))
    assert diffusers_unet.differences(again, diffusers_unet.unet_keys(_dconfig(FLIP))) == []


def _dconfig(folder):
    return json.load(open(os.path.join(folder, "config.json")))


def _copy(src, dst, tensors=None, config=None):
    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, os.path.join(dst, WEIGHTS))
    if config is not None:
        json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_attention_names_of_2022_are_read(tmp_path):
    """The google/ddpm-* files predate diffusers' to_q/to_k/to_v/to_out.0 names."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = safe_arrays.read(os.path.join(TINY, WEIGHTS))
    renamed = {}
    for name, a in tensors.items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = a
    assert any(".proj_attn." in n for n in renamed)
    folder = _copy(TINY, tmp_path / "legacy", tensors=renamed)
    ref = np.load(os.path.join(TINY, "reference.npz"))
    config = import_weights.import_diffusers(folder, str(tmp_path / "run"))
    out = _outputs(str(tmp_path / "run"), config, ref)
    assert np.abs(out - ref["out"]).max() <= 1e-5 * np.abs(ref["out"]).max()


@pytest.mark.parametrize("damage", ["missing", "left over", "wrong shape"])
def test_tensors_that_do_not_fit_are_named(damage, tmp_path):
    tensors = safe_arrays.read(os.path.join(TINY, WEIGHTS))
    name = "down_blocks.1.resnets.0.conv_shortcut.weight"  # [16, 8, 1, 1]
    if damage == "missing":
        del tensors[name]
        want = f"tensor {name} is missing from the diffusers file"
        shape = "(16, 8"
    elif damage == "left over":
        tensors["down_blocks.1.resnets.0.extra.weight"] = np.zeros((3,), np.float32)
        want, shape = "down_blocks.1.resnets.0.extra.weight", "(3,)"
    else:
        tensors[name] = np.zeros((16, 4, 1, 1), np.float32)
        want, shape = f"tensor {name} has shape (16, 4, 1, 1), expected (16, 8", "(16, 8"
    folder = _copy(TINY, tmp_path / "bad", tensors=tensors)
    with pytest.raises(import_weights.ImportError_) as e:
        import_weights.import_diffusers(folder, str(tmp_path / "run"))
    assert want in str(e.value) and shape in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")  # nothing written


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("_class_name", "UNet2DConditionModel", "_class_name='UNet2DConditionModel'"),
        ("act_fn", "gelu", "act_fn='gelu'"),
        ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
        ("attention_head_dim", 8, "attention_head_dim=8"),  # two heads of 8 at 16 channels
        ("downsample_padding", 1, "downsample_padding=1"),
        ("freq_shift", 0, "freq_shift=0"),
        ("norm_eps", 1e-5, "norm_eps=1e-05"),
        ("mid_block_scale_factor", 2, "mid_block_scale_factor=2"),
        ("center_input_sample", True, "center_input_sample=True"),
        ("add_attention", False, "add_attention=False"),
        ("num_class_embeds", 10, "num_class_embeds=10"),
        ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
        ("cross_attention_dim", 768, "cross_attention_dim=768"),  # unknown to UNet2DModel
        ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"], "[0]"),
        ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D"], "disagree"),
        ("out_channels", 5, "out_channels=5"),
        ("block_out_channels", [8, 12, 16], "block_out_channels"),
    ],
)
def test_architectures_we_cannot_compute_are_refused(key, value, named):
    dconfig = dict(_dconfig(TINY), **{key: value})
    with pytest.raises(diffusers_unet.DiffusersImportError) as e:
        diffusers_unet.unet_keys(dconfig)
    assert named in str(e.value) and key.strip("_") in str(e.value)


def test_missing_keys_take_diffusers_defaults():
    """A config.json without flip_sin_to_cos means diffusers' default True (cos first), and one
    without downsample_padding means 1 (symmetric): the latter is not our network."""
    dconfig = _dconfig(TINY)
    del dconfig["downsample_padding"]
    with pytest.raises(diffusers_unet.DiffusersImportError, match="downsample_padding=1"):
        diffusers_unet.unet_keys(dconfig)


def test_scheduler_keys():
    keys = diffusers_unet.scheduler_keys(
        {
            "beta_schedule": "squaredcos_cap_v2",
            "variance_type": "fixed_small_log",
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "num_train_timesteps": 4000,
        }
    )
    assert keys == {
        "diffusion.num_timesteps": 4000,
        "diffusion.beta_schedule": "cosine",
        "diffusion.var_type": "fixedsmall",
        "diffusion.mean_type": "v",
        "sampling.clip_denoised": False,
    }
    assert diffusers_unet.scheduler_keys({})["diffusion.var_type"] == "fixedsmall"  # its default
    for bad in (
        {"trained_betas": [0.1, 0.2]},
        {"beta_schedule": "sigmoid"},
        {"variance_type": "learned"},
        {"thresholding": True},
    ):
        with pytest.raises(diffusers_unet.DiffusersImportError, match=next(iter(bad))):
            diffusers_unet.scheduler_keys(bad)


def test_a_config_that_differs_is_named_key_by_key(tmp_path):
    from configs import cifar10_ddpm

    with pytest.raises(import_weights.ImportError_) as e:
        import_weights.import_diffusers(TINY, str(tmp_path / "run"), cifar10_ddpm.get_config())
    message = str(e.value)
    for line in (
        "model.ch: config 128, diffusers files 8",
        "model.norm_groups: config 32",
        "data.image_size: config 32, diffusers files 8",
        "model.dropout",
    ):
        assert line in message
    assert not os.path.exists(tmp_path / "run")


def test_pickles_are_refused(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    for path in (str(folder), str(folder / "diffusion_pytorch_model.bin")):
        with pytest.raises(import_weights.ImportError_, match="pickle.*safetensors"):
            import_weights.find_sources(path)


def test_a_bare_safetensors_file_needs_a_config(tmp_path):
    shutil.copy(os.path.join(TINY, WEIGHTS), tmp_path / "w.safetensors")
    with pytest.raises(import_weights.ImportError_, match="no config.json beside it"):
        import_weights.import_diffusers(str(tmp_path / "w.safetensors"), str(tmp_path / "run"))


def test_a_workdir_with_a_run_is_not_overwritten(tmp_path):
    import_weights.import_diffusers(TINY, str(tmp_path / "run"))
    with pytest.raises(import_weights.ImportError_, match="already holds a run"):
        import_weights.import_diffusers(TINY, str(tmp_path / "run"))


def _local_data(tmp_path, size=8, channels=3):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "images.npz")
    shape = (16, size, size, channels)
    np.savez(
        path,
        train=rng.integers(0, 256, shape, np.uint8),
        test=rng.integers(0, 256, shape, np.uint8),
    )
    return path


def _run_config(tmp_path):
    sources = import_weights.find_sources(TINY)
    config, _ = import_weights.build_config(sources, None)
    overrides = {
        "data.dataset": _local_data(tmp_path),
        "data.random_flip": False,
        "training.batch_size": 4,
        "training.num_train_steps": 2,
        "training.log_every": 1,
        "training.checkpoint_every": 2,
        "training.sample_every": 0,
        "training.eval_at_end": False,
        "eval.num_examples": 8,
        "eval.batch_size": 8,
        "eval.bound_num_t": 2,
        "eval.figures": (),
        "sampling.method": "ddim",
        "sampling.num_steps": 3,
        "sampling.num_samples": 2,
        "sampling.batch_size": 2,
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def test_imported_run_evaluates_and_fine_tunes(tmp_path, caplog):
    config = _run_config(tmp_path)
    workdir = str(tmp_path / "run")
    import_weights.import_diffusers(TINY, workdir, config)
    imported = checkpoints.load_params(workdir)

    metrics = evaluation.evaluate(config, workdir)
    assert np.isfinite(metrics["bpd"]) and metrics["bpd"] > 0

    with caplog.at_level(logging.INFO):
        state = train.train_and_evaluate(config, workdir)
    assert "Fine-tuning the parameters imported from" in caplog.text
    assert int(state.step) == 2
    changed = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, imported
    )
    assert max(jax.tree.leaves(changed)) > 0  # trained from the imported weights
    # The optimiser's step counts start at the import: two updates, from a fresh state.
    counts = [
        int(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if "count" in jax.tree_util.keystr(path)
    ]
    assert counts and set(counts) == {2}


def _python_m(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(1))
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.system
@pytest.mark.smoke
def test_command_line_imports_and_samples(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _python_m("diffusion_jax.import_weights", f"--diffusers={TINY}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Imported 182 tensors (71323 parameters)" in proc.stderr
    sample = ("--mode=sample", "--config.sampling.method=ddim", "--config.sampling.num_steps=2")
    sizes = ("--config.sampling.num_samples=2", "--config.sampling.batch_size=2")
    config = f"--config=configs/workdir.py:{workdir}"
    proc = _python_m("diffusion_jax.main", config, f"--workdir={workdir}", *sample, *sizes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
    images = samples[samples.files[0]]
    assert images.shape[0] == 2 and images.shape[-3:] == (8, 8, 3)
    # A pickle on the command line: one line, exit 1.
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x80\x02}q\x00.")
    proc = _python_m(
        "diffusion_jax.import_weights", f"--diffusers={bad}", f"--workdir={tmp_path / 'other'}"
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is a PyTorch pickle" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("damage", ["nan", "inf", "random bytes"])
def test_tensors_that_are_not_finite_are_refused_naming_them(damage, tmp_path):
    """Issue 41 row 5: NaN, inf or random bytes in the tensor data: refused, nothing written."""
    name = "down_blocks.1.resnets.0.conv_shortcut.weight"
    if damage == "random bytes":
        folder = _copy(TINY, tmp_path / "bad")
        path = os.path.join(folder, WEIGHTS)
        raw = bytearray(open(path, "rb").read())
        start = 8 + int.from_bytes(raw[:8], "little")  # the data after the JSON header
        raw[start:] = np.random.default_rng(0).bytes(len(raw) - start)
        open(path, "wb").write(bytes(raw))
        want = "tensor(s) hold NaN or infinite values ("
    else:
        tensors = safe_arrays.read(os.path.join(TINY, WEIGHTS))
        tensors[name] = tensors[name].copy()
        tensors[name][0, 1] = np.nan if damage == "nan" else np.inf
        folder = _copy(TINY, tmp_path / "bad", tensors=tensors)
        want = f"1 tensor(s) hold NaN or infinite values ({name}: 1 of 128): a damaged"
    with pytest.raises(import_weights.ImportError_) as e:
        import_weights.import_diffusers(folder, str(tmp_path / "run"))
    assert str(e.value).startswith(f"{folder}/{WEIGHTS}: ") and want in str(e.value)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "file, key, value, want",
    [
        ("config.json", "block_out_channels", "eight", "must be a list of integers > 0"),
        ("config.json", "layers_per_block", 1.5, "must be an integer"),
        ("scheduler_config.json", "num_train_timesteps", 0, "must be an integer >= 2"),
        ("scheduler_config.json", "beta_end", 2, "must be a number in (0, 1)"),
        ("scheduler_config.json", "clip_sample", "yes", "must be true or false"),
    ],
)
def test_diffusers_values_of_the_wrong_type_are_named_with_file_and_key(
    tmp_path, file, key, value, want
):
    """Issue 41 row 7: every value read is type-checked; the message names the file and key."""
    folder = _copy(TINY, tmp_path / "bad")
    path = os.path.join(folder, file)
    values = json.load(open(path))
    values[key] = value
    json.dump(values, open(path, "w"))
    kind = "config" if file == "config.json" else "scheduler"
    with pytest.raises(import_weights.ImportError_) as e:
        import_weights.import_diffusers(folder, str(tmp_path / "run"))
    assert str(e.value) == f"{path}: diffusers {kind} key {key}={value!r} {want}."


def test_without_a_scheduler_config_the_diffusion_taken_is_said_in_one_line(tmp_path, caplog):
    """Issue 41 row 6 (docs/weights.md): the base config's diffusion is taken and named."""
    folder = _copy(TINY, tmp_path / "noscheduler")
    os.remove(os.path.join(folder, "scheduler_config.json"))
    with caplog.at_level(logging.WARNING):
        config = import_weights.build_config(import_weights.find_sources(folder), None)[0]
    lines = [r.getMessage() for r in caplog.records if "scheduler_config.json" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"No scheduler_config.json beside {folder}/{WEIGHTS}")
    for taken in (
        "diffusion.num_timesteps=1000",
        "diffusion.beta_schedule='linear'",
        "diffusion.var_type='fixedlarge'",
    ):
        assert taken in lines[0] and taken.split("=")[0] + "=" in lines[0]
    assert config.diffusion.num_timesteps == 1000 and config.diffusion.var_type == "fixedlarge"


def test_a_workdir_that_is_a_file_or_read_only_is_one_line_and_a_kill_leaves_none(
    tmp_path, monkeypatch
):
    """Issue 41 row 8; and the import is written whole in WORKDIR.tmp-PID and renamed."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(import_weights.ImportError_, match=r"afile is a file, not a folder"):
        import_weights.import_diffusers(TINY, str(tmp_path / "afile"))
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: p != str(tmp_path / "ro") and real_access(p, m))
    with pytest.raises(import_weights.ImportError_) as e:
        import_weights.import_diffusers(TINY, str(tmp_path / "ro"))
    assert str(e.value) == (
        f"--workdir {tmp_path / 'ro'}: {tmp_path / 'ro'} cannot be written (read-only, or not "
        "yours); import into a folder you can write."
    )
    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"run.tmp-{dead.pid}" / "checkpoints").mkdir(parents=True)  # a kill -9's

    def killed(src, dst):
        raise KeyboardInterrupt  # between the complete temporary folder and the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        import_weights.import_diffusers(TINY, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path)) == ["afile", "ro"]  # no run, no temporary
