"""Reading one ``.safetensors`` file into numpy, without torch.

safetensors' numpy path looks dtypes up by name, and numpy only knows ``"bfloat16"`` and the
float8 names once ml_dtypes has registered them: without that import, BF16 tensors fail with
"data type 'bfloat16' not understood".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy; see the module docstring)
import numpy as np
from safetensors import SafetensorError, safe_open


def read_safetensors(path: str | Path, *,
                     select: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """``{key: array}`` for the tensors of one ``.safetensors`` file, reading only what is selected.

    ``select(key)`` is called once per key; only the tensors it accepts are read (default: all),
    one at a time from the memory-mapped file. Raises ``ValueError`` naming the file if its header
    or data is truncated or corrupt.
    """
    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys() if select is None or select(key)}
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable safetensors file: {e}") from e
