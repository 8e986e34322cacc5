"""Shared defaults for every VIPA config; they live in the package (`vipa_jax.defaults`) so that
checkpoints and bundles saved by older versions load with defaults for fields added since."""

from vipa_jax.defaults import get_base_config

__all__ = ["get_base_config"]
