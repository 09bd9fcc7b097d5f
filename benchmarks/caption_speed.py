"""Captioning speed from the image: images/s of fixed-length greedy captioning at the official CPU
harness's sizes.

Times :func:`pixelllm.models.pixel_llm.inference.generate` (encoders, prompt adapter, the
language model's prefill and the KV-cached greedy loop with the official repeat rule, plus each
token's points) in its fixed-length mode: every image gets exactly ``--new-tokens`` tokens, as
the harness's ``infer_L128`` times the official ``PixelLlmModel.inference`` over a fixed-length
greedy loop. The model is ``configs/stages.py:trace_harness`` (224 canvas, 128-wide encoders, a
2 x 128 text model with the 30522-word vocabulary; random weights), the prompt the harness's
"A long image caption: " ids, the images noise::

    python -m benchmarks.caption_speed                          # 128 tokens, batch 1 and 8
    python -m benchmarks.caption_speed --new-tokens 8 --batches 1 --calls 2 --warmup 1 \\
        --out caption_speed_check.json                           # a quick check

Each path is compiled apart (ahead of time), then timed over ``--calls`` calls after
``--warmup`` untimed ones: the split-state ``jax.jit`` of
:func:`~pixelllm.models.pixel_llm.inference.compile_entry` (what the Predictor runs), and, with
``--nnx-jit`` (default on), the same function under ``nnx.jit``, which walks the module graph on
every call. Prints a table and writes ``benchmarks/results/caption_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import results_file
from benchmarks.decode_speed import device_name
from benchmarks.train_step import BOS, EOS, PROMPT_IDS, time_calls
from configs import stages
from pixelllm.models.pixel_llm import inference
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM

CONFIG = "trace_harness"


def harness_inputs(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``generate``'s array arguments for ``batch`` noise images on the whole canvas with the
    harness's prompt (one slot, padded to the config's context length)."""
    canvas, context = config.data.sizes.canvas, config.data.sizes.context_length
    rs = np.random.RandomState(seed)
    tokens = np.zeros((batch, 1, context), np.int32)
    tokens[..., :len(PROMPT_IDS)] = PROMPT_IDS
    return {"image": rs.uniform(0, 255, (batch, canvas, canvas, 3)).astype(np.float32),
            "valid_wh": np.full((batch, 2), canvas, np.float32),
            "context_tokens": tokens,
            "context_mask": np.broadcast_to(np.arange(context) < len(PROMPT_IDS),
                                            tokens.shape).copy()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calls", type=int, default=5, help="timed calls per path and batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nnx-jit", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the same function under nnx.jit")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPUs to run on (the first N this process may use)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    # Before XLA's CPU client exists: its thread pool is sized from this affinity.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])

    config = stages.get_config(CONFIG)
    model = PixelLLM.from_config(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)
    settings = inference.DecodeSettings(bos_id=BOS, eos_id=EOS, pad_id=0,
                                        max_new_tokens=args.new_tokens, fixed_length=True)
    split_jit = inference.compile_entry(inference.generate, graphdef, settings=settings)

    @nnx.jit
    def graph_jit(model: PixelLLM, inputs: dict[str, jax.Array]) -> inference.Generation:
        return inference.generate(model, **inputs, settings=settings)

    rows = []
    for batch in args.batches:
        inputs = jax.device_put(harness_inputs(config, batch))
        start = time.perf_counter()
        compiled = split_jit.lower(state, inputs).compile()
        paths = {"jax.jit (split state)": (time.perf_counter() - start,
                                           lambda c=compiled: c(state, inputs))}
        if args.nnx_jit:
            # nnx.jit compiles on its first call (the graph traversal is its per-call cost).
            start = time.perf_counter()
            jax.block_until_ready(graph_jit(model, inputs))
            paths["nnx.jit"] = (time.perf_counter() - start, lambda: graph_jit(model, inputs))
        for path, (compile_s, call) in paths.items():
            out = call()
            if out.tokens.shape != (batch, 1, args.new_tokens):
                raise RuntimeError(f"{path}: tokens {out.tokens.shape}, expected "
                                   f"{(batch, 1, args.new_tokens)}")
            timing = time_calls(lambda c=call: jax.block_until_ready(c()), warmup=args.warmup,
                                calls=args.calls)
            rows.append(dict(path=path, batch=batch, compile_s=compile_s, **timing,
                             images_per_s=batch / timing["median_s"],
                             ms_per_token=1e3 * timing["median_s"] / args.new_tokens))

    print(f"\n{args.new_tokens}-token fixed-length greedy captioning from the image, "
          f"{CONFIG} (canvas {config.data.sizes.canvas}), {args.threads} CPU thread(s), median "
          f"of {args.calls} calls after {args.warmup} warm-up")
    header = (f"{'path':>22} {'batch':>5} {'compile s':>9} {'median s':>9} {'min s':>7} "
              f"{'images/s':>9} {'ms/token':>9}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['path']:>22} {row['batch']:>5} {row['compile_s']:>9.1f} "
              f"{row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['images_per_s']:>9.2f} "
              f"{row['ms_per_token']:>9.2f}")

    result = dict(device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                  jax=jax.__version__, python=platform.python_version(), config=CONFIG,
                  new_tokens=args.new_tokens, threads=args.threads, calls=args.calls,
                  warmup=args.warmup, load_average=os.getloadavg(), rows=rows)
    results_file.write(result, f"caption_speed_{device_name()}", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``.
QUICK = ["--new-tokens", "8", "--batches", "1", "--calls", "2", "--warmup", "1", "--no-nnx-jit"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows: images/s and ms per token per path and batch."""
    rows = []
    for row in result["rows"]:
        name = f"{result['new_tokens']}-token caption, {row['path']}, batch {row['batch']}"
        rows.append(dict(measure=name, value=row["images_per_s"], unit="images/s"))
        rows.append(dict(measure=name + ", per token", value=row["ms_per_token"], unit="ms"))
    return rows


if __name__ == "__main__":
    main()
