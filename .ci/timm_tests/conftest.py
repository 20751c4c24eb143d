"""Copied by .ci/run to the root of timm's unpacked source archive: timm's own tests see the NOAH models."""
import noah_mlp  # noqa: F401  (registers the noah_* models and the width baselines in timm)
