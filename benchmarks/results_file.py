"""Writes a benchmark's result as JSON under benchmarks/results/ (or where ``--out`` says)."""

import json
import pathlib


def write(result: dict, name: str, out: str | pathlib.Path | None) -> pathlib.Path:
    """Writes ``result`` to ``out``, default ``benchmarks/results/<name>.json``; returns the path."""
    path = pathlib.Path(out) if out else pathlib.Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
