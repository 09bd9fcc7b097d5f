"""The JSON file an evaluator's ``write_json`` writes: its settings and its metrics."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any


def write_results(path: str | pathlib.Path, fields: Mapping[str, Any]) -> None:
    """Writes ``fields`` (an evaluator's settings and ``"metrics"``) to ``path`` as indented JSON,
    parent folders created."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(fields), indent=2) + "\n")
