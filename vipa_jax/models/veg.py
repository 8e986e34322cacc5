"""Visual Expressive Generator (VEG): VIPA's visual expressive tokens Ê_V.

Step 1, `select_global_cues` (visual informative token retrieval):
    X = φ_V(F_v), Y = φ_L(Ê_L), S_c = cos(Y, X)                       # (B, L, N)
    S' = softmax((S_c + g) / τ) over the N visual tokens, g ~ Gumbel   # train only
    M  = top-k(S', k = ⌈r·N⌉) per linguistic token, straight-through  # forward hard, backward soft
Step 2, `refine_local_cues` (visual context refinement):
    F_a = Linear(mean_{n: M=1} F_v)                                    # one token per cue
    F̂ = MHCA(F_a, F_v, mask=M) + F_a;  F_r = MLP(F̂) + F̂
    Ê = MHSA(F_r, padding masked) + F_r;  Ê_V = MLP(Ê) + Ê            # (B, L, C)
(each residual is followed by LayerNorm). The pixel-contrastive loss reads the [CLS] row of
S_c as a relevance map: `cls_relevance = s · S_c[:, 0] + b` with a learnable scale s (init 10)
and bias b, since raw cosines in [-1, 1] cannot reach confident sigmoid probabilities.

Ablation switches (config `veg.*`, paper Tables V–VIII, Fig. 4):
    step1:     False → no retrieval: F_a = Linear(Ê_L), MHCA over all visual tokens.
    step2:     False → Ê_V = F_a (no refinement).
    cues:      'global' ([CLS] only) | 'local' (words only) | 'both'.
    topk_ratio r;  selection: 'gumbel_topk' | 'threshold' (sigmoid((S_c − t)/τ) > ½,
               straight-through) | 'none' (soft weights S', no hard selection, MHCA unmasked).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vipa_jax.models.layers import AttentionBlock, Dense, FeedForwardBlock, einsum

Array = jax.Array

SELECTIONS = ("gumbel_topk", "threshold", "none")
CUES = ("global", "local", "both")


def gumbel_noise(key: Array, shape: tuple[int, ...]) -> Array:
    """Standard Gumbel(0, 1) samples, -log(-log U)."""
    u = jax.random.uniform(key, shape, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    return -jnp.log(-jnp.log(u))


def straight_through(hard: Array, soft: Array) -> Array:
    """Forward value exactly `hard`, gradient of `soft` (straight-through estimator)."""
    return hard + (soft - jax.lax.stop_gradient(soft))


def topk_mask(scores: Array, k: int) -> Array:
    """{0,1} mask with exactly k ones per row along the last axis (the k largest scores)."""
    _, idx = jax.lax.top_k(scores, k)  # (..., k)
    return jax.nn.one_hot(idx, scores.shape[-1], dtype=scores.dtype).sum(axis=-2)


def num_selected(ratio: float, num_tokens: int) -> int:
    """k = ⌈r·N⌉ clipped to [1, N]."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"veg.topk_ratio must be in (0, 1], got {ratio}")
    return max(1, min(num_tokens, math.ceil(ratio * num_tokens)))


def cue_mask(token_mask: Array, cues: str) -> Array:
    """Which linguistic tokens act as cues: (B, L) bool from the padding mask and `veg.cues`."""
    valid = token_mask.astype(bool)
    is_cls = jnp.arange(valid.shape[1]) == 0
    if cues == "both":
        return valid
    if cues == "global":
        return valid & is_cls[None]
    if cues == "local":
        return valid & ~is_cls[None]
    raise ValueError(f"veg.cues must be one of {CUES}, got {cues!r}")


class GlobalCueSelection(nn.Module):
    """Step 1: cosine relevance S_c, Gumbel top-k retrieval mask M (paper Eq. for S', M)."""

    dim: int
    topk_ratio: float = 0.3
    selection: str = "gumbel_topk"
    threshold: float = 0.0
    tau_init: float = 1.0
    noise_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        vis: Array,  # (B, N, Cv)
        lang: Array,  # (B, L, Cl)
        *,
        train: bool,
    ) -> dict[str, Array]:
        if self.selection not in SELECTIONS:
            raise ValueError(f"veg.selection must be one of {SELECTIONS}, got {self.selection!r}")
        x = Dense(self.dim, dtype=self.dtype, name="phi_v")(vis)  # (B, N, D)
        y = Dense(self.dim, dtype=self.dtype, name="phi_l")(lang)  # (B, L, D)
        x = x.astype(jnp.float32)
        y = y.astype(jnp.float32)
        x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
        y = y / (jnp.linalg.norm(y, axis=-1, keepdims=True) + 1e-6)
        sim = einsum("bld,bnd->bln", y, x)  # S_c (B, L, N), in [-1, 1]
        log_tau = self.param("log_tau", nn.initializers.constant(math.log(self.tau_init)), ())
        tau = jnp.exp(log_tau)
        noisy = sim
        if train and self.noise_scale > 0 and self.selection != "none":
            noisy = sim + self.noise_scale * gumbel_noise(self.make_rng("gumbel"), sim.shape)
        if self.selection == "gumbel_topk":
            soft = jax.nn.softmax(noisy / tau, axis=-1)  # S'
            hard = topk_mask(soft, num_selected(self.topk_ratio, sim.shape[-1]))
            mask = straight_through(hard, soft)
        elif self.selection == "threshold":
            soft = jax.nn.sigmoid((noisy - self.threshold) / tau)
            mask = straight_through((soft > 0.5).astype(soft.dtype), soft)
        else:  # 'none': soft relevance weights, nothing discarded
            soft = jax.nn.softmax(sim / tau, axis=-1)
            mask = soft
        scale = self.param("relevance_scale", nn.initializers.constant(10.0), ())
        bias = self.param("relevance_bias", nn.initializers.zeros, ())
        return {
            "similarity": sim,  # S_c (B, L, N)
            "soft": soft,  # S' (B, L, N)
            "mask": mask,  # M (B, L, N): hard forward / soft backward
            "tau": tau,
            "cls_relevance": scale * sim[:, 0] + bias,  # (B, N) logits for the contrastive loss
        }


class LocalCueRefinement(nn.Module):
    """Step 2: F_a, masked MHCA over F_v, MLP, MHSA over cues, MLP → Ê_V (B, L, D)."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        f_a: Array,  # (B, L, D) aggregated cue tokens
        vis: Array,  # (B, N, Cv)
        select: Array | None,  # (B, L, N) bool retrieval mask, or None = attend to all
        cues: Array,  # (B, L) bool
        *,
        train: bool,
    ) -> Array:
        det = not train
        block = dict(num_heads=self.num_heads, dropout_rate=self.dropout_rate, dtype=self.dtype)
        ffn = dict(mlp_ratio=self.mlp_ratio, dropout_rate=self.dropout_rate, dtype=self.dtype)
        cross_mask = None if select is None else select[:, None]  # (B, 1, L, N)
        f = AttentionBlock(**block, name="cross_attn")(f_a, vis, mask=cross_mask, deterministic=det)
        f = FeedForwardBlock(**ffn, name="cross_mlp")(f, deterministic=det)  # F_r
        self_mask = cues[:, None, None, :]  # (B, 1, 1, L): padding / non-cue tokens masked
        e = AttentionBlock(**block, name="self_attn")(f, mask=self_mask, deterministic=det)
        return FeedForwardBlock(**ffn, name="self_mlp")(e, deterministic=det)  # Ê_V


class VisualExpressiveGenerator(nn.Module):
    """VEG: advanced language tokens + vision features → visual expressive tokens Ê_V."""

    dim: int = 256
    num_heads: int = 8
    mlp_ratio: float = 4.0
    topk_ratio: float = 0.3
    selection: str = "gumbel_topk"
    threshold: float = 0.0
    tau_init: float = 1.0
    noise_scale: float = 1.0
    step1: bool = True
    step2: bool = True
    cues: str = "both"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.select_global = GlobalCueSelection(
            dim=self.dim,
            topk_ratio=self.topk_ratio,
            selection=self.selection,
            threshold=self.threshold,
            tau_init=self.tau_init,
            noise_scale=self.noise_scale,
            dtype=self.dtype,
        )
        self.aggregate = Dense(self.dim, dtype=self.dtype)  # F_a = Linear(·)
        if self.step2:
            self.refine_local = LocalCueRefinement(
                dim=self.dim,
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                dropout_rate=self.dropout_rate,
                dtype=self.dtype,
            )

    def select_global_cues(self, vis: Array, lang: Array, *, train: bool) -> dict[str, Array]:
        """Step 1 (retrieval): S_c, S', M and the [CLS] relevance logits."""
        return self.select_global(vis, lang, train=train)

    def refine_local_cues(
        self, f_a: Array, vis: Array, select: Array | None, cues: Array, *, train: bool
    ) -> Array:
        """Step 2 (refinement): F_a → Ê_V."""
        return self.refine_local(f_a, vis, select, cues, train=train)

    def __call__(
        self,
        vis: Array,  # (B, N, Cv) F_v
        lang: Array,  # (B, L, Cl) Ê_L
        token_mask: Array,  # (B, L) {0,1}
        *,
        train: bool,
    ) -> dict[str, Array]:
        cues = cue_mask(token_mask, self.cues)  # (B, L)
        step1 = self.select_global_cues(vis, lang, train=train)
        if self.step1:
            m = step1["mask"].astype(vis.dtype)  # (B, L, N)
            pooled = einsum("bln,bnc->blc", m, vis)
            pooled = pooled / jnp.maximum(m.sum(-1, keepdims=True), 1.0)  # mean of retrieved
            f_a = self.aggregate(pooled)  # (B, L, D)
            select = None if self.selection == "none" else jax.lax.stop_gradient(m) > 0.5
        else:
            f_a = self.aggregate(lang)
            select = None
        tokens = self.refine_local_cues(f_a, vis, select, cues, train=train) if self.step2 else f_a
        return {
            "tokens": tokens,  # Ê_V (B, L, D)
            "token_mask": cues,  # (B, L) bool: which Ê_V tokens are valid keys/values
            **step1,
        }


def build_veg(cfg: Any, dtype: Any = jnp.float32) -> VisualExpressiveGenerator:
    """VEG from the `model.veg` config section."""
    return VisualExpressiveGenerator(
        dim=cfg.dim,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        topk_ratio=cfg.topk_ratio,
        selection=cfg.selection,
        threshold=cfg.threshold,
        tau_init=cfg.tau_init,
        noise_scale=cfg.noise_scale,
        step1=cfg.step1,
        step2=cfg.step2,
        cues=cfg.cues,
        dropout_rate=cfg.dropout,
        dtype=dtype,
    )
