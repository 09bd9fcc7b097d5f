"""Greedy decoding speed: the KV cache against recomputing the whole sequence every step.

The official PixelLLM decoder has no cache: each step re-runs the language model over the full
``max_caption_length`` buffer and reads the logits at the current index. This script times that
scheme against :mod:`pixelllm.language.decoding` with a ``DecoderLM`` KV cache, both in one jitted
``lax.while_loop`` (prefill included), both timed in full (every step of every length), at each
batch size::

    python -m benchmarks.decode_speed                      # 32, 128, 512 new tokens; batch 1, 16
    python -m benchmarks.decode_speed --lengths 32 --batches 1 --runs 5

Reports the median wall time of ``--runs`` calls after a warm-up call (compile time apart),
tokens/s (over the batch) and ms per step, prints a table and writes
``benchmarks/results/decode_speed_<device>.json``. Decoding runs at fixed length
(``eos_id=None``): every run decodes all tokens; the recomputed tokens are checked against the
cached ones (``tokens_match_cached``; float rounding may flip a near-tie argmax, so it is
reported, not required).

The model is a small Llama-style one (:data:`MODEL`, 0.4M parameters: 2 layers of width 64, a
2048-word vocabulary) so that the recomputing side, whose cost grows with the length squared,
finishes at 512 tokens and batch 16 (4.3M token positions a call) in about 10 minutes for
the default settings on an idle 2-core CPU. At this size a cached step costs little more than
the loop's own overhead, so the speed-ups are lower than a real-size model's would be.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import results_file
from pixelllm.language import decoder, decoding

# Llama-style, 2 layers of width 64 (grouped-query attention 4 q / 2 kv heads of 16), 2048 words:
# the size at which the full recomputing side fits the time budget (module docstring).
MODEL = dict(vocab_size=2048, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, activation="silu", norm_eps=1e-5, rope_theta=500_000.0)


def _prefill(model, prompt, max_length):
    batch, width = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(width), prompt.shape)
    cache = None if max_length is None else model.init_cache(batch, max_length)
    out = model(tokens=prompt, positions=positions, input_mask=jnp.ones(prompt.shape, bool),
                cache=cache)
    return out.logits[:, -1], jnp.full((batch,), width, jnp.int32), out.cache


def cached_greedy(model, prompt, steps):
    logits, positions, cache = _prefill(model, prompt, prompt.shape[1] + steps)
    return decoding.greedy_decode(decoding.cached_step(model), logits=logits, positions=positions,
                                  cache=cache, max_new_tokens=steps, eos_id=None).tokens


def recomputed_greedy(model, prompt, steps, width):
    """The official scheme: every step runs the model without a cache over all ``width`` slots
    (the prompt, the tokens so far and padding) and reads the logits at the current index."""
    logits, positions, _ = _prefill(model, prompt, None)
    return decoding.greedy_decode(decoding.recompute_step(model, width), logits=logits,
                                  positions=positions,
                                  cache=decoding.recompute_state(prompt, positions, width),
                                  max_new_tokens=steps, eos_id=None).tokens


def _time(fn, *args, runs, **static):
    """(compile seconds, median seconds per call, output) with one warm-up call."""
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), out


def _row(length, mode, compile_s, latency, batch) -> dict:
    return dict(new_tokens=length, mode=mode, batch=batch, compile_s=compile_s,
                latency_s=latency, ms_per_step=1e3 * latency / length,
                tokens_per_s=batch * length / latency)


def device_name() -> str:
    device = jax.devices()[0]
    name = "cpu" if device.platform == "cpu" else device.device_kind
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    model = decoder.DecoderLM(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = sum(x.size for x in jax.tree.leaves(state))

    @functools.partial(jax.jit, static_argnames=("steps",))
    def cached(state, prompt, *, steps):
        return cached_greedy(nnx.merge(graphdef, state), prompt, steps)

    @functools.partial(jax.jit, static_argnames=("steps", "width"))
    def recomputed(state, prompt, *, steps, width):
        return recomputed_greedy(nnx.merge(graphdef, state), prompt, steps, width)

    rows = []
    for batch in args.batches:
        prompt = jax.random.randint(jax.random.key(0), (batch, args.prompt), 0,
                                    MODEL["vocab_size"])
        for length in args.lengths:
            compile_s, seconds, tokens = _time(cached, state, prompt, runs=args.runs,
                                               steps=length)
            rows.append(_row(length, "cached", compile_s, seconds, batch))
            compile_s, seconds, recomputed_tokens = _time(
                recomputed, state, prompt, runs=args.runs, steps=length,
                width=args.prompt + length)
            rows.append(_row(length, "recompute", compile_s, seconds, batch))
            rows[-1]["tokens_match_cached"] = bool(
                np.array_equal(np.asarray(recomputed_tokens), np.asarray(tokens)))
            rows[-1]["slowdown_vs_cached"] = rows[-1]["latency_s"] / rows[-2]["latency_s"]
            print(f"batch {batch}, {length} tokens: cached {rows[-2]['latency_s']:.3f} s, "
                  f"recompute {seconds:.3f} s", flush=True)

    print(f"device {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), DecoderLM "
          f"{params / 1e6:.2f}M params, prompt {args.prompt}, median of {args.runs} runs after "
          "a warm-up")
    header = (f"{'batch':>5} {'new tokens':>10} {'mode':>10} {'compile s':>10} {'latency s':>10} "
              f"{'ms/step':>9} {'tokens/s':>9} {'vs cached':>9}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        ratio = f"{row['slowdown_vs_cached']:.1f}x" if "slowdown_vs_cached" in row else ""
        print(f"{row['batch']:>5} {row['new_tokens']:>10} {row['mode']:>10} "
              f"{row['compile_s']:>10.2f} {row['latency_s']:>10.3f} {row['ms_per_step']:>9.2f} "
              f"{row['tokens_per_s']:>9.1f} {ratio:>9}")

    result = dict(device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                  jax=jax.__version__, python=platform.python_version(), model=MODEL,
                  parameters=params, batches=args.batches, prompt_tokens=args.prompt,
                  runs=args.runs, load_average=os.getloadavg(), rows=rows)
    results_file.write(result, f"decode_speed_{device_name()}", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``.
QUICK = ["--lengths", "8", "--batches", "2", "--runs", "1"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows: tokens/s per batch, length and mode, and the KV cache's speed-up
    over recomputing (the official scheme; issue 23's target: >= 10x at 128 tokens)."""
    rows = []
    for row in result["rows"]:
        rows.append(dict(measure=f"{row['mode']} greedy, {row['new_tokens']} tokens, batch "
                                 f"{row['batch']}",
                         value=row["tokens_per_s"], unit="tokens/s"))
        if "slowdown_vs_cached" in row:
            rows.append(dict(measure=f"cached speed-up over recompute, {row['new_tokens']} "
                                     f"tokens, batch {row['batch']}",
                             value=row["slowdown_vs_cached"], unit="x",
                             target=(">=", 10.0) if row["new_tokens"] == 128 else None))
    return rows


if __name__ == "__main__":
    main()
