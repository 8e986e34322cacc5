"""Configs: every dataset config builds, and saved configs load over today's defaults."""

import json

import pytest

from configs import refcoco, refcoco_plus, refcocog, referit, synthetic
from vipa_jax.defaults import get_base_config, with_defaults


@pytest.mark.parametrize(
    "module,arg,dataset,split_by",
    [(refcoco, None, "refcoco", "unc"), (refcoco_plus, None, "refcoco+", "unc"),
     (refcocog, None, "refcocog", "umd"), (referit, None, "refclef", "berkeley"),
     (synthetic, None, "synthetic", "unc")],
)
def test_dataset_configs(module, arg, dataset, split_by):
    c = module.get_config(arg)
    assert (c.data.dataset, c.data.split_by) == (dataset, split_by)
    assert set(c.to_dict()) == set(get_base_config().to_dict())  # no section lost or invented


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'refcocoz'"):
        refcoco.get_config("refcocoz")


def test_saved_config_loads_over_defaults():
    c = synthetic.get_config()
    saved = json.loads(json.dumps(c.to_dict()))  # what a checkpoint stores
    del saved["model"]["fusion_op"]  # a field added after this config was saved
    saved["model"]["veg"]["topk_ratio"] = 0.5
    saved["custom"] = {"note": "kept"}
    got = with_defaults(saved)
    assert got.model.fusion_op == get_base_config().model.fusion_op
    assert got.model.veg.topk_ratio == 0.5
    assert got.model.swin.depths == c.model.swin.depths  # list -> tuple again
    assert isinstance(got.model.lang_stage_layers, tuple)
    assert got.custom.note == "kept"
    assert got.model.image_size == 128


def test_compilation_cache_is_turned_on_once(tmp_path, monkeypatch) -> None:
    """`enable_compilation_cache`: off for '', `~` expanded and the folder created, a cache set
    before (JAX_COMPILATION_CACHE_DIR, as the test suite sets) kept, and a folder that cannot be
    made leaves it off; the configs default to a folder under the user's cache."""
    import jax

    from vipa_jax.backend import DEFAULT_COMPILATION_CACHE_DIR, enable_compilation_cache

    assert get_base_config().compilation_cache_dir == DEFAULT_COMPILATION_CACHE_DIR
    assert DEFAULT_COMPILATION_CACHE_DIR.startswith("~/")
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compilation_cache("") is None
        assert jax.config.jax_compilation_cache_dir is None
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        assert enable_compilation_cache(str(blocker / "xla")) is None  # warned, still off
        got = enable_compilation_cache("~/cache/xla")
        assert got == str(tmp_path / "cache" / "xla") and (tmp_path / "cache" / "xla").is_dir()
        assert jax.config.jax_compilation_cache_dir == got
        assert enable_compilation_cache(str(tmp_path / "other")) == got  # the one set is kept
        assert not (tmp_path / "other").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_xla_options_parse_and_reject_clearly() -> None:
    """`train.xla_options` is written as in XLA_FLAGS; values are typed as XLA wants them (a
    bool option given the string 'false' is an XLA error), and a malformed item names the
    field and the item."""
    from vipa_jax.backend import parse_xla_options

    assert get_base_config().train.xla_options == ""
    assert parse_xla_options("") == {} and parse_xla_options("  \n") == {}
    got = parse_xla_options("--xla_gpu_enable_triton_gemm=false xla_gpu_autotune_level=0\n"
                            "--xla_dump_to=/tmp/x --xla_gpu_autotune_gemm_rtol=0.25 "
                            "--xla_cpu_enable_fast_math=TRUE")
    assert got == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0,
                   "xla_dump_to": "/tmp/x", "xla_gpu_autotune_gemm_rtol": 0.25,
                   "xla_cpu_enable_fast_math": True}
    assert type(got["xla_gpu_autotune_level"]) is int
    # ';' separates too: one `--variant` / AB_VARIANTS item cannot hold a space
    assert parse_xla_options("--xla_gpu_enable_triton_gemm=false;xla_gpu_autotune_level=1;") == {
        "xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 1}
    from benchmarks.common import parse_variant
    name, overrides = parse_variant(
        "fast:train.xla_options=--xla_gpu_autotune_level=1;--xla_gpu_enable_triton_gemm=false")
    assert name == "fast" and parse_xla_options(overrides["train.xla_options"]) == {
        "xla_gpu_autotune_level": 1, "xla_gpu_enable_triton_gemm": False}
    for bad in ("xla_gpu_enable_triton_gemm", "--xla_gpu_enable_triton_gemm=",
                "gpu_enable_triton_gemm=false", "--XLA_FOO=1", "-xla_foo=1"):
        with pytest.raises(ValueError, match=r"train\.xla_options: .* is not an XLA option"):
            parse_xla_options(f"--xla_dump_to=/tmp/x {bad}")
