"""Where vlm_jax keeps what it can rebuild: features, offline replicas, converted checkpoints."""

from __future__ import annotations

import os

ENV = "VLM_JAX_CACHE"
DEFAULT = "~/.cache/vlm_jax"


def cache_root() -> str:
    """$VLM_JAX_CACHE, or ~/.cache/vlm_jax: the one place every program caches into."""
    return os.path.expanduser(os.environ.get(ENV, DEFAULT))


def models_dir() -> str:
    """Where offline replicas and toy checkpoints are written (`<cache>/models`)."""
    return os.path.join(cache_root(), "models")
