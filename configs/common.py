"""Pieces shared by the config files."""

import ml_collections

from pixelllm import sharding


def sharding_config(mesh_shape=(1, -1, 1)) -> ml_collections.ConfigDict:
    """Mesh shape over (data, fsdp, tensor), -1 = fill with the remaining devices, and the
    logical-to-mesh rules (see pixelllm/sharding.py)."""
    return ml_collections.ConfigDict({
        "mesh_shape": tuple(mesh_shape),
        "rules": [list(rule) for rule in sharding.DEFAULT_RULES],
    })
