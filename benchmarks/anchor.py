"""The official PixelLLM's CPU timing harness (``../shared/anchors/scenic``) as a subprocess, for
benchmarks that report ratios to the official implementation measured in the same run.

The harness runs the official scenic code at a tiny configuration in a venv of its own (set it up
once with ``bash ../shared/anchors/scenic/setup.sh SCENIC_GIT``); :func:`run_anchor` runs some of
its measurements (``run_anchor.py --only``) pinned to the same CPUs as ours and returns its JSON.
The constants are the harness's synthetic inputs, which our side reproduces.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ANCHOR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "anchors" / "scenic"
ANCHOR_VENV = pathlib.Path(os.environ.get("SCENIC_ANCHOR_VENV") or pathlib.Path(
    os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "scenic-anchor-venv")
# The harness's context: "A long image caption: " as BERT-uncased ids, then EOS.
PROMPT_IDS = (1037, 2146, 3746, 14408, 1024, 102)
BOS, EOS, FIRST_WORD_ID = 101, 102, 1996


def run_anchor(*, only: list[str], threads: int, calls: int, warmup: int,
               anchor: pathlib.Path = ANCHOR, venv: pathlib.Path = ANCHOR_VENV) -> dict:
    """The harness's JSON for its measurements ``only`` (``train_step``, ``greedy_L32``,
    ``infer_L128``, ``beam4_L128``, ...: keys of its ``timings``), run on the first ``threads``
    CPUs with ``warmup`` untimed and ``calls`` timed calls each. Exits with the setup command
    when the harness's venv is missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"no harness venv at {venv}: run `bash {anchor}/setup.sh SCENIC_GIT` first "
                 "(or pass --no-anchor)")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "anchor.json"
        command = [str(python), str(anchor / "run_anchor.py"), "--only", ",".join(only),
                   "--threads", str(threads), "--calls", str(calls), "--warmup", str(warmup),
                   "--out", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    missing = sorted(set(only) - set(result["timings"]))
    if missing:
        raise RuntimeError(f"the harness ran no {missing} (run_anchor.py --only "
                           f"{','.join(only)}); its measurements: {sorted(result['timings'])}")
    return result
