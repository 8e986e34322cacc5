"""Default VIPA config (the paper's recipe); `configs/*.py` override parts of it.

Sections (each owned by one part of the code):
  model    -> vipa_jax/models/*        data  -> vipa_jax/data/*
  loss     -> vipa_jax/losses.py       optim -> vipa_jax/train/optim.py
  train    -> train.py / loop.py       sharding -> vipa_jax/train/sharding.py
  ckpt     -> checkpointing            eval  -> eval.py / metrics.py
"""

from collections.abc import Mapping
from typing import Any

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # JAX's persistent compilation cache for train.py / eval.py / demo.py ('' = off;
    # JAX_COMPILATION_CACHE_DIR, when set, wins): reruns load compiled programs
    c.compilation_cache_dir = "~/.cache/vipa_jax/xla"

    # --- model (Swin-B w12 + BERT-base, the paper's model) --------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.image_size = 480
    c.model.max_tokens = 21  # including [CLS] and [SEP]
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    # what bfloat16 matmuls ask XLA for: 'float32' results (rounded back to bfloat16) | 'native'
    # (bfloat16 results) | 'auto' (float32 on a CPU backend, where XLA:CPU then runs them in its
    # GEMM library, AMX/AVX512-BF16 included; native elsewhere); the same values up to rounding
    c.model.dot_results = "auto"
    # inference (`vipa.with_inference_cache`): 'auto' also stores the (F, C) kernel of each
    # projection with few input rows (words) on a CPU backend, where XLA:CPU's GEMM library
    # would repack the (C, F) one on every call (BERT-base at 21 tokens: 35 instead of 53 ms;
    # about 0.4 GB more memory for the paper model) | 'off'
    c.model.transposed_kernels = "auto"
    c.model.remat = False  # recompute Swin/BERT blocks, fusions and decoder blocks in the backward
    # what those blocks keep besides their inputs: 'full' (nothing, least memory) | 'dots' (the
    # projections' and MLPs' matmul outputs; attention scores, convs, norms are recomputed) |
    # 'dots_all' (every matmul output)
    c.model.remat_policy = "full"
    c.model.swin = ml_collections.ConfigDict(
        dict(
            embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
            mlp_ratio=4.0, drop_path_rate=0.3, patch_size=4,
            ape=False,  # learned absolute position embedding (Swin's `ape`; not in Swin-B)
            ape_init="trunc_normal",  # 'trunc_normal' (Swin's) | 'sine' (2-D sinusoidal start)
            # window attention: 'einsum' (ours) | 'xla' | 'cudnn' (jax.nn.dot_product_attention;
            # cudnn = cuDNN fused attention, GPU with bfloat16/float16 compute only)
            attention_impl="einsum",
            # deferred (divide E·V by the row sums) | normalized (the textbook softmax) |
            # compact (normalized, its weights and backward in the compute dtype: in bfloat16
            # no float32 copy of the weights); the same function (layers.check_softmax)
            attention_softmax="deferred",
            # auto (separate on CPU, else fused) | fused (one (C, 3C) q/k/v GEMM, one window
            # partition) | separate; the same parameters and function
            qkv_projection="auto",
            # run each stage's (unshifted, shifted) block pairs as one lax.scan (stage 3 of
            # Swin-B: 9 pairs); the same parameters and function, a faster compile
            scan_blocks=False,
            # with scan_blocks: store those pairs' parameters stacked (layers_i/block_pairs,
            # leading axis = pair) instead of stacking them every step; a smaller program and
            # optimizer, another param tree (swin.stack_block_pairs converts)
            stacked_params=False,
        )
    )
    c.model.bert = ml_collections.ConfigDict(
        dict(
            vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12,
        )
    )

    # Encoder: fusion = early (CrossVLT) | late (LAVT) | none. Language stage 1 = BERT embeddings +
    # the first lang_stage_layers[0] layers (pretrained); stages 2-4 = one cross-attention block
    # (early only) + lang_stage_layers[i] new BERT layers, optionally initialized from pretrained
    # layers 6.. (lang_later_from_pretrained).
    c.model.fusion = "early"
    c.model.fusion_op = "add"  # inside each fusion: add (CrossVLT) | mul (LAVT's PWAM)
    c.model.lang_stage_layers = (6, 1, 1, 1)
    c.model.lang_later_from_pretrained = False
    c.model.fusion_head_dim = 64
    c.model.fusion_min_dim = 256
    # Visual Expressive Generator (paper Tables V-VIII, Fig. 4).
    c.model.veg = ml_collections.ConfigDict(
        dict(
            dim=512, num_heads=8, mlp_ratio=4.0, dropout=0.0,
            kv="vision",  # decoder K/V: vision (Ê_V) | vanilla_lang (E_L) | advanced_lang (Ê_L)
            step1=True, step2=True,
            cues="both",  # global ([CLS]) | local (words) | both
            topk_ratio=0.3,
            selection="gumbel_topk",  # gumbel_topk | threshold | none
            threshold=0.0, tau_init=1.0, noise_scale=1.0,
        )
    )
    c.model.decoder = ml_collections.ConfigDict(
        dict(hidden_dim=512, head_dim=64, mlp_ratio=4.0, norm="batch", dropout=0.0,
             # 3×3 convs: auto (on CPU winograd for float32, taps for bfloat16; else xla) |
             # xla (cuDNN on GPU) | taps (nine GEMMs summed in float32: bf16 GEMMs on CPU) |
             # winograd (Winograd F(6×6) from 96 px, F(4×4) from 48, XLA below; with the
             # inference cache F(4×4)/F(6×6) from 24 px: same parameters, fewer multiply-adds;
             # faster CPU inference at 480, see benchmarks/README.md) | winograd2 | winograd4
             # | winograd6 (one tile size everywhere)
             conv_impl="auto")
    )
    c.model.factory = ""  # "module:attr" building the model instead of VIPA (research forks)

    # --- data ------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "refer"  # refer | referit | tfds | synthetic
    c.data.root = ""  # refer-layout root (images/, refcoco/, ...)
    c.data.dataset = "refcoco"
    c.data.split_by = "unc"
    c.data.train_split = "train"
    c.data.eval_splits = ("val",)
    c.data.vocab = ""  # path to vocab.txt ("" = the BERT init folder's vocab.txt)
    # grain worker processes, and read threads in each (the main process when 0 workers), that
    # decode, resize and batch the examples; threads scale the pipeline on a GPU host's cores
    # without extra processes (benchmarks/README.md, "Input pipeline")
    c.data.num_workers = 0
    c.data.num_threads = 2
    c.data.on_error = "raise"  # raise | skip (skip counts and warns)
    c.data.tfds_builder = "ref_coco_bv"  # source=tfds: a builder whose examples carry masks
    c.data.synthetic_num_images = 1000  # source=synthetic: generated into data.root if absent
    c.data.synthetic_image_size = 160
    c.data.synthetic_seed = 0
    c.data.factory = ""  # "module:attr" building the train iterator instead of the pipeline

    # --- loss ------------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.bce_weight = 1.0
    c.loss.dice_weight = 1.0
    c.loss.contrastive = True
    c.loss.contrastive_weight = 1.0
    c.loss.factory = ""  # "module:attr" loss instead of vipa_loss

    # --- optimizer (AdamW, poly 0.9 per step, no warmup) -----------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-5
    c.optim.weight_decay = 1e-2
    c.optim.poly_power = 0.9
    c.optim.warmup_steps = 0
    c.optim.clip_grad_norm = 0.0  # 0 = off
    c.optim.grad_accum_steps = 1
    c.optim.freeze_bert_embeddings = True
    c.optim.freeze_regexes = ()  # extra frozen parameter paths (regexes on "a/b/c")
    c.optim.lr_multipliers = ()  # ("regex=mult", ...): per-module lr, first match wins
    c.optim.no_decay_regexes = None  # None = norms, biases, relative-position tables
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    # --- training loop ---------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16  # global batch
    c.train.num_epochs = 40
    c.train.total_steps = 0  # > 0 overrides num_epochs
    c.train.log_every = 50
    c.train.eval_every = 0  # steps; 0 = once per epoch
    c.train.skip_nonfinite = False
    # How the step keeps its state on a non-finite loss/gradient: auto | cond | select
    # (`train.step.make_train_step`; auto = one lax.cond on CPU, a where per leaf elsewhere).
    c.train.finite_guard = "auto"
    # How the gradient norm is summed: auto | per_leaf | grouped (`train.optim.global_norm`;
    # auto = per leaf on CPU, one reduction per distinct leaf shape elsewhere).
    c.train.grad_norm = "auto"
    # XLA options for the train step alone, written as in XLA_FLAGS (or separated by ';'), e.g.
    # "--xla_gpu_enable_triton_gemm=false" (cuBLAS for every GEMM); "" = XLA's defaults
    # (`backend.parse_xla_options`; part of the step's compilation-cache key).
    c.train.xla_options = ""
    # The step as two programs, gradients and optimizer update, compiled at the same time
    # (`train.step.SplitTrainStep`): a shorter compile for one more launch per step.
    c.train.split_update = False
    c.train.init_swin = ""  # official .pth or HF folder/safetensors; "" = random
    c.train.init_bert = ""  # HF folder (safetensors or flax_model.msgpack); "minilm"; "" = random
    c.train.swin_params_path = "encoder/backbone"  # where init_swin lands in the param tree
    c.train.bert_params_path = "encoder/text_encoder"
    c.train.image_every = 0  # steps between TensorBoard prediction overlays; 0 = off
    c.train.progress = True  # tqdm progress bar

    # --- sharding --------------------------------------------------------------------------
    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh_shape = (-1, 1)  # (data, model); -1 = all remaining devices
    c.sharding.fsdp = False
    c.sharding.fsdp_min_size = 4096  # smaller leaves stay replicated under any rules
    # Parameter sharding by logical axes (vipa_jax/train/sharding.py): () = replicated, or
    # FSDP_RULES when fsdp=True; e.g. ("embed=data", "mlp=model", "heads=model") adds tensor
    # parallelism over the 'model' mesh axis.
    c.sharding.logical_axis_rules = ()
    c.sharding.param_axes = ()  # ("regex=ax1,ax2", ...): logical axes of a fork's new params

    # --- checkpoints -----------------------------------------------------------------------
    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = 1000
    c.ckpt.keep = 3
    c.ckpt.keep_best = True  # also keep the best by val mIoU
    c.ckpt.best_metric = "val_mIoU"
    c.ckpt.async_save = True

    # --- evaluation ------------------------------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.protocol = "lavt"  # lavt | original | both
    return c


def with_defaults(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A saved (JSON-decoded) config on top of today's defaults.

    Fields added after the config was saved get their defaults; JSON lists become tuples where
    the default is a tuple; keys the defaults do not know are kept as saved.
    """

    def merge(base: ml_collections.ConfigDict, new: Mapping[str, Any]) -> None:
        for key, value in new.items():
            if key in base and isinstance(base[key], ml_collections.ConfigDict) and isinstance(
                    value, Mapping):
                merge(base[key], value)
                continue
            if key in base and isinstance(base[key], tuple) and isinstance(value, list):
                value = tuple(value)
            with base.ignore_type():
                base[key] = value

    config = get_base_config()
    merge(config, saved)
    return config
