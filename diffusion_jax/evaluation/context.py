"""What every evaluator reads: the run (config, model, EMA parameters, mesh, workdir), the
metrics of the evaluators before it, and the one masked-sum pass of the bound over a split."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import (
    checkpoints,
    input_pipeline,
    models,
    objectives,
    reporting,
    sampling,
    sharding,
    timesteps,
)
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import vdm as vdm_lib


@dataclasses.dataclass
class EvalContext:
    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any  # the EMA parameters, replicated over ``mesh``
    mesh: jax.sharding.Mesh
    workdir: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # results so far
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)  # shared, never written

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.workdir, "eval")

    def figure_path(self, name: str) -> str:
        return os.path.join(self.eval_dir, "figures", f"{name}.png")

    @property
    def conditional(self) -> bool:
        """A class-conditional model: its bound is -log p(x | c) with the true labels c."""
        return bool(self.config.model.num_classes)

    @functools.cached_property
    def diffusion(self) -> diffusion_lib.GaussianDiffusion:
        return objectives.make_diffusion(self.config)

    def eval_batches(self, split: str, num_examples: int) -> tuple[int, Any]:
        """(n, this host's padded and masked batches of ``eval.batch_size``) over the first
        ``num_examples`` of ``split`` (0: all), with labels for a conditional model."""
        source = input_pipeline.load_split(self.config, split)
        n = source.num_examples if num_examples <= 0 else min(num_examples, source.num_examples)
        batches = input_pipeline.eval_batches(
            source,
            self.config.eval.batch_size,
            n,
            jax.process_index(),
            jax.process_count(),
            labels=self.conditional,
        )
        return n, batches

    def bound_sums(self, split: str, num_examples: int) -> dict[str, np.ndarray]:
        """Σ over the first ``num_examples`` of ``split`` (0: all) of every term of the bound,
        per example and per t, and the distortion of x0_hat (``diffusion.bound_terms``).

        Batches of ``eval.batch_size`` (padded and masked), batch i with key
        fold_in(run eval key, i); each batch's T terms run ``sampling.steps_per_call(T)`` at a
        time under a progress bar. Cached per (split, num_examples) for later evaluators.

        Batch i holds examples i·B .. i·B + B − 1 whatever ``num_examples`` is (only the mask
        and the padding rows differ), and each example's terms depend on its own row alone. So
        the per-example terms of the batches covering the first ``_kept_examples(split)``
        examples are kept, and a later request for at most that many (the rate–distortion
        curve's ``eval.rate_distortion.num_examples`` after bits/dim on the whole split) sums them
        again under its own mask instead of running the T network calls per example a second time.
        """
        cache_key = ("bound", split, num_examples)
        if cache_key in self.cache:
            return self.cache[cache_key]
        config, d, mesh = self.config, self.diffusion, self.mesh
        num_t, num_bins = d.num_timesteps, config.data.num_bins
        per_call = sampling.steps_per_call(num_t)
        repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

        def terms(params, batch, key, t_start):
            x0 = input_pipeline.to_model_space(batch["image"], num_bins)  # [B, ...]
            net = models.model_fn(self.model, params, labels=batch.get("label"))
            return diffusion_lib.bound_terms(
                d, net, x0, key, t_start, per_call, config.eval.clip_denoised, num_bins
            )  # each [B, per_call]

        def reduce(parts, batch, mask):
            out = {k: jnp.concatenate([p[k] for p in parts], axis=1)[:, :num_t] for k in parts[0]}
            x0 = input_pipeline.to_model_space(batch["image"], num_bins)
            prior = diffusion_lib.prior_bpd(d, x0)
            tb = out["terms_bpd"]  # [B, T]
            total = tb.sum(axis=1) + prior  # [B]
            m = mask[:, None]  # [B, 1]
            return dict(
                bpd=jnp.sum(total * mask),
                bpd_sq=jnp.sum(total**2 * mask),
                decoder_bpd=jnp.sum(tb[:, 0] * mask),  # L_0
                kl_bpd=jnp.sum(tb[:, 1:].sum(axis=1) * mask),  # sum over t >= 1 of L_t
                prior_bpd=jnp.sum(prior * mask),  # L_T
                terms_bpd=jnp.sum(tb * m, axis=0),  # [T]
                mse=jnp.sum(out["mse"] * m, axis=0),  # [T]
                x0_sq_err=jnp.sum(out["x0_sq_err"] * m, axis=0),  # [T]
                x0_rmse=jnp.sum(jnp.sqrt(out["x0_sq_err"]) * m, axis=0),  # [T]
                count=jnp.sum(mask),
            )

        terms_fn = jax.jit(terms, in_shardings=(repl, data, repl, repl), out_shardings=data)
        reduce_fn = jax.jit(reduce, out_shardings=repl)
        n, batches = self.eval_batches(split, num_examples)
        size = config.eval.batch_size
        num_batches = -(-n // size)
        rows = input_pipeline.host_slice(size, jax.process_index(), jax.process_count())

        def prefix_mask(i: int) -> jax.Array:  # [B] 1 for the examples of batch i below n
            mask = np.arange(i * size, (i + 1) * size) < n
            return sharding.global_batch(mesh, mask[rows].astype(np.float32))

        kept_n, kept = self.cache.get(("bound_batches", split), (0, []))
        total = None
        if n <= kept_n and num_batches <= len(kept):  # every example's terms are known
            for i, (batch, parts) in enumerate(kept[:num_batches]):
                sums = reduce_fn(parts, batch, prefix_mask(i))
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            self.cache[cache_key] = jax.tree.map(np.asarray, jax.device_get(total))
            return self.cache[cache_key]

        keep = -(-min(self._kept_examples(split), n) // size)  # batches whose terms are kept
        kept = []
        key = objectives.run_keys(config.seed)["eval"]
        with reporting.progress_bar(num_batches * num_t, f"bound ({split})", unit="t") as bar:
            for i, (batch, mask) in enumerate(batches):
                batch = sharding.global_batch(mesh, batch)
                mask = sharding.global_batch(mesh, mask)
                batch_key = jax.random.fold_in(key, i)
                parts = []
                for t_start in range(0, num_t, per_call):
                    parts.append(terms_fn(self.params, batch, batch_key, t_start))
                    jax.block_until_ready(parts[-1])  # the bar counts finished work
                    bar.update(min(per_call, num_t - t_start))
                sums = reduce_fn(parts, batch, mask)
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
                if i < keep:
                    kept.append((batch, parts))
        if kept and n > kept_n:
            self.cache[("bound_batches", split)] = (n, kept)
        self.cache[cache_key] = jax.tree.map(np.asarray, jax.device_get(total))
        return self.cache[cache_key]

    def _kept_examples(self, split: str) -> int:
        """How many leading examples of ``split`` ``bound_sums`` keeps the terms of: the
        rate–distortion curve's (``eval.rate_distortion.num_examples``, 0 = all) when the run
        draws it on this split, else none (the terms are [examples, T] arrays: kept only where
        reused)."""
        ev = self.config.eval
        if split != ev.split or "rate_distortion" not in tuple(ev.figures):
            return 0
        n = ev.rate_distortion.num_examples
        return n if n > 0 else np.iinfo(np.int64).max

    def bound_t_probs(self) -> jax.Array:
        """p_t [T] of ``eval.bound_t_sampler = "importance"``: the run's own importance
        distribution over t (``timesteps.importance_probs`` of the newest checkpoint's loss
        history, what its loss-aware training drew t from)."""
        if "bound_t_probs" not in self.cache:
            history = checkpoints.load_state_item(self.workdir, "loss_history")
            self.cache["bound_t_probs"] = timesteps.importance_probs(history)
        return self.cache["bound_t_probs"]

    def bound_estimate_sums(self, split: str, num_examples: int) -> dict[str, np.ndarray]:
        """Σ over the first ``num_examples`` of ``split`` (0: all) of the bound with Σ_t L_t
        estimated from ``eval.bound_num_t`` = K timesteps per example (``eval.bound_t_sampler``:
        stratified, or the run's importance distribution), L_0 and L_T exact
        (``diffusion.sampled_bound_terms``): K + 1 network calls per example instead of T.

        Each example's estimate is unbiased and its t are drawn independently of the other
        examples' (batch i from fold_in(fold_in(run eval key, 0xB0), i)), so the spread of the
        per-example totals counts both the images and the t: ``bpd_sq`` gives the standard
        error of both. Cached per (split, num_examples).
        """
        cache_key = ("bound_estimate", split, num_examples)
        if cache_key in self.cache:
            return self.cache[cache_key]
        config, d = self.config, self.diffusion
        e, num_bins = config.eval, config.data.num_bins
        probs = self.bound_t_probs() if e.bound_t_sampler == "importance" else None

        def sums(params, batch, mask, key):
            x0 = input_pipeline.to_model_space(batch["image"], num_bins)  # [B, ...]
            t_key, noise_key = jax.random.split(key)
            b = x0.shape[0]
            if probs is None:
                t, w = timesteps.stratified_bound_timesteps(
                    t_key, b, d.num_timesteps, e.bound_num_t
                )
            else:
                t, w = timesteps.importance_bound_timesteps(t_key, probs, b, e.bound_num_t)
            net = models.model_fn(self.model, params, labels=batch.get("label"))
            out = diffusion_lib.sampled_bound_terms(
                d, net, x0, noise_key, t, w, e.clip_denoised, num_bins
            )
            prior = diffusion_lib.prior_bpd(d, x0)  # [B]
            total = out["decoder_bpd"] + out["kl_bpd"] + prior  # [B]
            return dict(
                bpd=jnp.sum(total * mask),
                bpd_sq=jnp.sum(total**2 * mask),
                decoder_bpd=jnp.sum(out["decoder_bpd"] * mask),
                kl_bpd=jnp.sum(out["kl_bpd"] * mask),
                prior_bpd=jnp.sum(prior * mask),
                count=jnp.sum(mask),
            )

        label = f"bound, {e.bound_num_t} t per example ({split})"
        self.cache[cache_key] = self._masked_sums(sums, split, num_examples, 0xB0, label)
        return self.cache[cache_key]

    def _masked_sums(
        self, sums: Any, split: str, num_examples: int, tag: int, label: str
    ) -> dict[str, np.ndarray]:
        """Σ over the padded, masked batches of ``split`` of ``sums(params, batch, mask, key)``
        (jitted on the mesh), batch i with key fold_in(fold_in(run eval key, tag), i), under a
        progress bar of examples."""
        mesh, batch_size = self.mesh, self.config.eval.batch_size
        repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
        sums_fn = jax.jit(sums, in_shardings=(repl, data, data, repl), out_shardings=repl)
        n, batches = self.eval_batches(split, num_examples)
        key = jax.random.fold_in(objectives.run_keys(self.config.seed)["eval"], tag)
        total = None
        with reporting.progress_bar(n, label, unit="example") as bar:
            for i, (batch, mask) in enumerate(batches):
                batch = sharding.global_batch(mesh, batch)
                mask = sharding.global_batch(mesh, mask)
                part = sums_fn(self.params, batch, mask, jax.random.fold_in(key, i))
                total = part if total is None else jax.tree.map(jnp.add, total, part)
                bar.update(int(min(batch_size, n - i * batch_size)))
        return jax.tree.map(np.asarray, jax.device_get(total))

    def continuous_bound_sums(self, split: str, num_examples: int) -> dict[str, np.ndarray]:
        """Σ over the first ``num_examples`` of ``split`` (0: all) of a vdm model's bound
        (``vdm.bound_terms``: L_0, the continuous diffusion term from ``eval.bound_num_t`` = K
        stratified t per example (0 counts as 1), L_1) and, with ``vdm.eval_num_steps`` = T > 0,
        of the T-step chain's bound from the same t and noise (keys ``*_finite``). Batch i from
        fold_in(fold_in(run eval key, 0xC0), i). Cached per (split, num_examples)."""
        cache_key = ("continuous_bound", split, num_examples)
        if cache_key in self.cache:
            return self.cache[cache_key]
        config = self.config
        e, num_bins = config.eval, config.data.num_bins
        num_t, num_steps = max(int(e.bound_num_t), 1), int(config.vdm.eval_num_steps)

        def sums(params, batch, mask, key):
            x0 = input_pipeline.to_model_space(batch["image"], num_bins)  # [B, ...]
            net = models.model_fn(self.model, params, labels=batch.get("label"))
            gamma = objectives.gamma_fn(self.model, params)
            out = {}
            for suffix, steps in (("", 0), ("_finite", num_steps))[: 2 if num_steps else 1]:
                terms = vdm_lib.bound_terms(net, gamma, x0, key, num_bins, num_t, steps)
                out |= {
                    "bpd" + suffix: jnp.sum(terms["total"] * mask),
                    "bpd_sq" + suffix: jnp.sum(terms["total"] ** 2 * mask),
                    "kl_bpd" + suffix: jnp.sum(terms["diffusion"] * mask),
                }
            out |= dict(
                decoder_bpd=jnp.sum(terms["decoder"] * mask),
                prior_bpd=jnp.sum(terms["prior"] * mask),
                count=jnp.sum(mask),
            )
            return out

        label = f"continuous bound, {num_t} t ({split})"
        self.cache[cache_key] = self._masked_sums(sums, split, num_examples, 0xC0, label)
        return self.cache[cache_key]
