"""BERT encoder in Flax linen, parameter tree identical to HF `FlaxBertModule`.

Paths (as in an HF `flax_model.msgpack`, no `bert` prefix):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  encoder/layer/<i>/attention/self/{query,key,value}/{kernel,bias}
  encoder/layer/<i>/attention/output/{dense,LayerNorm}/...
  encoder/layer/<i>/intermediate/dense/...,  encoder/layer/<i>/output/{dense,LayerNorm}/...
  pooler/dense/{kernel,bias}                                   (only with add_pooling_layer)

The model runs whole (`__call__`) or piecewise (`embed`, `run_layers`), so the VIPA fusion
encoder can run the embeddings + layers 0-5 first and single layers later. `BertAttention`
with `kv_dim` set is the cross-attention block of CrossVLT's language stages (language
queries over vision tokens of another width, then the post-LN residual of `BertSelfOutput`).

Attention masks: a (B, Lk) {0,1} padding mask (1 = real token), or a boolean mask
broadcastable to (B, H, Lq, Lk) with True = may attend.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vipa_jax.models.layers import (
    Dense,
    LayerNorm,
    MultiHeadAttention,
    exact_gelu,
    maybe_remat,
    padding_mask_to_attention_mask,
)

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters with HF `config.json` names (hashable, so usable as a module field)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(
                f"BertConfig: hidden_act {self.hidden_act!r} is not supported (only exact 'gelu')"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> BertConfig:
        """Build from a dict / ConfigDict / HF config dict; unknown keys are ignored."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        if not isinstance(d, Mapping):
            raise TypeError(f"BertConfig.from_dict expects a mapping, got {type(d).__name__}")
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(
                f"BertConfig: position_embedding_type {pos_type!r} is not supported "
                "(only 'absolute')"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
        """Read an HF `config.json`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BERT config file not found: {os.fspath(path)}")
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"BERT config file {os.fspath(path)} is not JSON: {e}") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with HF names."""
        return dataclasses.asdict(self)


class BertModelOutput(NamedTuple):
    """Outputs of `BertModel.__call__`."""

    last_hidden_state: Array  # (B, L, C)
    pooler_output: Array | None  # (B, C), None without a pooler
    hidden_states: tuple[Array, ...] | None  # embeddings + every layer, each (B, L, C)


def to_attention_mask(mask: Array | None) -> Array | None:
    """(B, Lk) {0,1} padding mask -> (B, 1, 1, Lk) bool; a higher-rank mask is cast to bool."""
    if mask is None:
        return None
    if mask.ndim == 2:
        return padding_mask_to_attention_mask(mask)
    return mask.astype(bool)


def _init(config: BertConfig) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=config.initializer_range)


def _dense(config: BertConfig, features: int, dtype: Dtype) -> nn.Dense:
    """Dense named `dense` with BERT's normal(initializer_range) kernel init."""
    return Dense(features, kernel_init=_init(config), dtype=dtype, name="dense")


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array,  # (B, L) int
        token_type_ids: Array | None = None,  # (B, L) int
        position_ids: Array | None = None,  # (B, L) or (L,) int
        *,
        deterministic: bool = True,
    ) -> Array:  # (B, L, C)
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"BertEmbeddings: sequence length {length} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = jnp.arange(length)[None, :]  # (1, L)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(
                num, cfg.hidden_size, embedding_init=_init(cfg), dtype=self.dtype, name=name
            )

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids.astype("i4"))
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids.astype("i4"))
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids.astype("i4"))
        x = LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfOutput(nn.Module):
    """Dense (to hidden) -> dropout -> LayerNorm(x + residual), after attention."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden: Array,  # (B, L, C) attention output, or (B, L, I) in BertOutput
        residual: Array,  # (B, L, C)
        *,
        deterministic: bool = True,
    ) -> Array:  # (B, L, C)
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, self.dtype)(hidden)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
            x + residual
        )


class BertAttention(nn.Module):
    """BERT attention block: MHSA (or MHCA over `kv` when `kv_dim` is set) + BertSelfOutput."""

    config: BertConfig
    kv_dim: int | None = None  # None: self-attention; else keys/values come from (B, Lk, kv_dim)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden: Array,  # (B, Lq, C)
        attention_mask: Array | None = None,  # (B, Lk) {0,1} or bool (B, H, Lq, Lk)-broadcastable
        kv: Array | None = None,  # (B, Lk, kv_dim), only with kv_dim
        *,
        deterministic: bool = True,
    ) -> Array:  # (B, Lq, C)
        cfg = self.config
        if self.kv_dim is None and kv is not None:
            raise ValueError("BertAttention: got kv but kv_dim is None (a self-attention block)")
        if self.kv_dim is not None:
            if kv is None:
                raise ValueError(f"BertAttention: kv_dim={self.kv_dim} needs a kv input")
            if kv.shape[-1] != self.kv_dim:
                raise ValueError(
                    f"BertAttention: kv has width {kv.shape[-1]}, expected kv_dim={self.kv_dim}"
                )
        attn = MultiHeadAttention(
            num_heads=cfg.num_attention_heads,
            qkv_features=cfg.hidden_size,
            use_output_proj=False,
            dropout_rate=cfg.attention_probs_dropout_prob,
            dtype=self.dtype,
            kernel_init=_init(cfg),
            name="self",
        )(hidden, kv, mask=to_attention_mask(attention_mask), deterministic=deterministic)
        return BertSelfOutput(cfg, dtype=self.dtype, name="output")(
            attn, hidden, deterministic=deterministic
        )


class BertIntermediate(nn.Module):
    """Dense to intermediate_size + exact GELU."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:  # (B, L, C) -> (B, L, I)
        cfg = self.config
        return exact_gelu(_dense(cfg, cfg.intermediate_size, self.dtype)(hidden))


class BertOutput(BertSelfOutput):
    """Dense (intermediate -> hidden) -> dropout -> LayerNorm(x + attention output)."""


class BertLayer(nn.Module):
    """One transformer layer: attention, intermediate, output (post-LN)."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden: Array,  # (B, L, C)
        attention_mask: Array | None = None,  # (B, L) {0,1} or bool (B, H, L, L)-broadcastable
        deterministic: bool = True,  # positional too, so nn.remat can mark it static
    ) -> Array:  # (B, L, C)
        cfg = self.config
        attn = BertAttention(cfg, dtype=self.dtype, name="attention")(
            hidden, attention_mask, deterministic=deterministic
        )
        inter = BertIntermediate(cfg, dtype=self.dtype, name="intermediate")(attn)
        return BertOutput(cfg, dtype=self.dtype, name="output")(
            inter, attn, deterministic=deterministic
        )


class BertLayerCollection(nn.Module):
    """Layers named "0", "1", ... (HF's `encoder/layer/<i>` paths); runs any range [start, stop)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False  # False, True ('full') or a name of layers.REMAT_POLICIES

    def setup(self) -> None:
        layer_cls = maybe_remat(BertLayer, self.remat, static_argnums=(3,))
        self.layers = [
            layer_cls(self.config, dtype=self.dtype, name=str(i))
            for i in range(self.config.num_hidden_layers)
        ]

    def __call__(
        self,
        hidden: Array,  # (B, L, C)
        attention_mask: Array | None = None,
        start: int = 0,
        stop: int | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[Array, tuple[Array, ...]]:  # (B, L, C), outputs of each layer run
        n = self.config.num_hidden_layers
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"BERT layer range [{start}, {stop}) is outside [0, {n})")
        mask = to_attention_mask(attention_mask)
        states = []
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, mask, deterministic)
            if output_hidden_states:
                states.append(hidden)
        return hidden, tuple(states)


class BertEncoder(nn.Module):
    """Stack of `BertLayer`s under `layer/<i>`."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False  # False, True ('full') or a name of layers.REMAT_POLICIES

    def setup(self) -> None:
        self.layer = BertLayerCollection(self.config, dtype=self.dtype, remat=self.remat)

    def __call__(
        self,
        hidden: Array,  # (B, L, C)
        attention_mask: Array | None = None,
        start: int = 0,
        stop: int | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[Array, tuple[Array, ...]]:  # (B, L, C), per-layer outputs
        return self.layer(
            hidden,
            attention_mask,
            start,
            stop,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
        )


class BertPooler(nn.Module):
    """tanh(Dense([CLS]))."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:  # (B, L, C) -> (B, C)
        cfg = self.config
        return jnp.tanh(_dense(cfg, cfg.hidden_size, self.dtype)(hidden[:, 0]))


class BertModel(nn.Module):
    """BERT encoder (HF `FlaxBertModule` tree); whole via `__call__`, piecewise via methods.

    Piecewise use: `model.apply(v, ids, tt, method=BertModel.embed)`, then
    `model.apply(v, h, mask, start, stop, method=BertModel.run_layers)`.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    add_pooling_layer: bool = True
    remat: bool | str = False  # False, True ('full') or a name of layers.REMAT_POLICIES

    def setup(self) -> None:
        self.embeddings = BertEmbeddings(self.config, dtype=self.dtype)
        self.encoder = BertEncoder(self.config, dtype=self.dtype, remat=self.remat)
        if self.add_pooling_layer:
            self.pooler = BertPooler(self.config, dtype=self.dtype)

    def embed(
        self,
        input_ids: Array,  # (B, L)
        token_type_ids: Array | None = None,  # (B, L)
        *,
        deterministic: bool = True,
    ) -> Array:  # (B, L, C)
        """Embeddings only (hidden_states[0])."""
        return self.embeddings(input_ids, token_type_ids, deterministic=deterministic)

    def run_layers(
        self,
        hidden: Array,  # (B, L, C)
        attention_mask: Array | None,  # (B, L) {0,1} or bool mask
        start: int,
        stop: int,
        *,
        deterministic: bool = True,
    ) -> Array:  # (B, L, C)
        """Run encoder layers [start, stop) on `hidden`."""
        return self.encoder(hidden, attention_mask, start, stop, deterministic=deterministic)[0]

    def pool(self, hidden: Array) -> Array:  # (B, L, C) -> (B, C)
        """Pooler on the [CLS] token."""
        if not self.add_pooling_layer:
            raise ValueError("BertModel.pool: the model was built with add_pooling_layer=False")
        return self.pooler(hidden)

    def __call__(
        self,
        input_ids: Array,  # (B, L) int
        attention_mask: Array | None = None,  # (B, L) {0,1}; None = all ones
        token_type_ids: Array | None = None,  # (B, L) int; None = zeros
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> BertModelOutput:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = self.embed(input_ids, token_type_ids, deterministic=deterministic)
        last, states = self.encoder(
            hidden,
            attention_mask,
            deterministic=deterministic,
            output_hidden_states=output_hidden_states,
        )
        pooled = self.pooler(last) if self.add_pooling_layer else None
        return BertModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=(hidden, *states) if output_hidden_states else None,
        )
