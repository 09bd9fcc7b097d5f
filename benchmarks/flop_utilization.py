"""Train step FLOP utilization: model FLOPs per step time, over the measured matmul peak.

For each PixelLLM config, the train step is built as the trainer builds it
(:class:`benchmarks.train_step.OurStep`); its FLOPs come from the compiled step's
``cost_analysis()`` and are cross-checked against an analytic count (2 x matmul parameters x
tokens through each tower, x3 for trained towers (forward, input and weight gradients), x1 for
frozen SAM (under ``stop_gradient``), plus attention's ``4 T^2 D`` per layer; the ratio of the two
says how close). Utilization = model FLOPs / median step time / peak, where the peak is the
float32 dense matmul rate (``jax.jit`` of an ``N x N @ N x N`` product) measured in the same run
on the same device with its calls interleaved with the step's (a matmul before every step and
one after the last), so both see the same load on a shared machine. Configs::

    tiny   configs/stages.py:trace_harness (what benchmarks/train_step.py times: 128-wide towers)
    mid    the same stage with the real widths and 2 layers each: EVA02 1024 (16 heads, SwiGLU
           2730), SAM 1280 (16 heads, neck 256), prompt adapter 512, a Llama-style text model
           of 1024 (16 / 8 heads of 64, FFN 4096, vocabulary 30522), 224 canvas, batch 4
    block  a bare pre-LayerNorm transformer block (width 1024, MLP 4096, 16 heads; forward and
           backward w.r.t. its weights): the reference utilization of plain matmul-bound code

The mid config is timed with every ``--remat`` policy (``model.remat``: "none" keeps every
activation, "full" recomputes each block in the backward pass); its model FLOPs are those of
the "none" step, so recomputation shows as lower utilization::

    python -m benchmarks.flop_utilization                      # tiny, mid (none, full), block
    python -m benchmarks.flop_utilization --configs block --matmul 1024

Prints a table and writes ``benchmarks/results/flop_utilization_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import results_file
from benchmarks.decode_speed import device_name
from benchmarks.train_step import OurStep
from configs import stages

TINY = "trace_harness"
# Real widths (EVA02-L, SAM ViT-H, official prompt adapter, a 1B-class text model's width), few
# layers, so a CPU step takes seconds and the matmul shapes are those of the paper's model.
MID = dict(
    batch_size=4,
    eva02=dict(embed_dim=1024, num_heads=16, depth=2),
    sam=dict(embed_dim=1280, num_heads=16, depth=2, out_chans=256, global_attn_indexes=(1,)),
    prompt_embed_dim=256,
    prompt_adapter=dict(dim=512, depth=2, num_heads=8, mlp_dim=2048, num_queries=32,
                        visual_features=1024),
    text_model=dict(hidden_size=1024, intermediate_size=4096, num_layers=2, num_heads=16,
                    num_kv_heads=8, head_dim=64),
)
# Parameters that are tables read by index or added, not multiplied: no matmul FLOPs.
NOT_MATMUL = ("pos_embed", "rel_pos", "embedding")


def mid_config(remat: str):
    """``trace_harness`` with :data:`MID`'s widths and ``model.remat = remat``, locked."""
    config = stages.get_config(TINY)
    config.unlock()
    model = config.model
    model.remat = remat
    model.eva02.update(MID["eva02"])
    model.sam.image_encoder.update(MID["sam"])
    model.sam.prompt_encoder.embed_dim = MID["prompt_embed_dim"]
    model.sam.mask_decoder.update(transformer_dim=MID["prompt_embed_dim"],
                                  iou_head_hidden_dim=MID["prompt_embed_dim"])
    model.prompt_adapter.update(MID["prompt_adapter"])
    model.language_model.model.update(MID["text_model"])
    config.data.batch_size = config.train.batch_size = MID["batch_size"]
    config.stage = f"{TINY}_mid_remat_{remat}"
    config.lock()
    return config


def matmul_params(state: nnx.State) -> dict[str, int]:
    """Matmul weights (every parameter of 2+ dimensions but tables) per tower: ``sam/<part>``
    for SAM, the top-level module otherwise; the language model's output layer apart."""
    counts: dict[str, int] = {}
    for path, variable in nnx.to_flat_state(state):
        names = [str(part) for part in path]
        value = variable.get_value()
        if value.ndim < 2 or any(table in names[-1] for table in NOT_MATMUL):
            continue
        tower = "/".join(names[:2]) if names[0] == "sam" else names[0]
        tower = "lm_head" if names[-1] == "lm_head" else tower
        counts[tower] = counts.get(tower, 0) + int(value.size)
    return counts


def analytic_flops(config, params: dict[str, int]) -> dict:
    """The train step's FLOPs counted from shapes: ``2 x params x tokens`` per tower and pass
    (x3 trained, x1 frozen SAM), attention ``4 T^2 D`` per layer and sequence. The prompt
    adapter's tokens are its queries (its projections of the image side are left out: a few
    percent of the step)."""
    model, sizes = config.model, config.data.sizes
    b, slots, text = config.train.batch_size, sizes.slots, sizes.text_length
    eva, sam, lm = model.eva02, model.sam.image_encoder, model.language_model.model
    eva_tokens = (sizes.canvas // eva.patch_size) ** 2 + 1
    sam_tokens = (sizes.canvas // sam.patch_size) ** 2
    prefix = model.prompt_adapter.num_queries + sizes.context_length
    lm_tokens = prefix + text
    forward = {
        "eva02": 2 * params.get("eva02", 0) * b * eva_tokens
        + eva.depth * 4 * eva_tokens ** 2 * eva.embed_dim * b,
        "sam/image_encoder": 2 * params.get("sam/image_encoder", 0) * b * sam_tokens
        + sam.depth * 4 * sam_tokens ** 2 * sam.embed_dim * b,
        "lm": 2 * params.get("lm", 0) * b * slots * lm_tokens
        + lm.num_layers * 4 * lm_tokens ** 2 * lm.num_heads * lm.head_dim * b * slots,
        # The vocabulary projection runs on the caption positions only.
        "lm_head": 2 * params.get("lm_head", 0) * b * slots * text,
        "prompt_adapter": 2 * params.get("prompt_adapter", 0) * b * slots * prefix,
        "point_head": 2 * params.get("point_head", 0) * b * slots * text,
    }
    passes = {tower: 1 if tower.startswith("sam") else 3 for tower in forward}
    per_tower = {tower: flops * passes[tower] for tower, flops in forward.items()}
    return dict(per_tower=per_tower, total=float(sum(per_tower.values())))


@dataclasses.dataclass(frozen=True)
class Peak:
    """The peak's probe: ``call()`` runs one float32 ``[n, n] @ [n, n]`` to completion."""

    n: int
    call: Callable[[], None]

    @property
    def flops(self) -> float:
        return 2.0 * self.n ** 3


def matmul_peak(n: int) -> Peak:
    """A compiled ``jax.jit`` float32 ``[n, n] @ [n, n]`` product as a :class:`Peak`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    return Peak(n=n, call=lambda: jax.block_until_ready(compiled(a, b)))


def time_against_peak(fn: Callable[[], None], peak: Peak, *, warmup: int, calls: int) -> dict:
    """``fn``'s median, min and every call's seconds over ``calls`` calls after ``warmup``, each
    call preceded by one of the peak's matmul (and one more after the last): the peak's GFLOP/s
    from the median of those, measured under the same load as ``fn``."""
    for _ in range(warmup):
        peak.call()
        fn()
    times, peak_times = [], []
    for index in range(calls + 1):
        start = time.perf_counter()
        peak.call()
        peak_times.append(time.perf_counter() - start)
        if index == calls:
            break
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return dict(median_s=statistics.median(times), min_s=min(times), calls_s=times,
                peak_calls_s=peak_times,
                peak_gflops_per_s=peak.flops / statistics.median(peak_times) / 1e9)


def _block(params: dict[str, jax.Array], x: jax.Array, heads: int) -> jax.Array:
    """A pre-LayerNorm transformer block: ``x`` ``[B, T, D]`` -> ``[B, T, D]``."""
    def norm(h):
        return (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)
    b, t, d = x.shape
    h = norm(x)
    q, k, v = (jnp.einsum("btd,de->bte", h, params[name]).reshape(b, t, heads, d // heads)
               for name in ("wq", "wk", "wv"))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // heads) ** 0.5, -1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    x = x + attended @ params["wo"]
    return x + jax.nn.gelu(norm(x) @ params["w1"]) @ params["w2"]


def bare_block(width: int, batch: int, tokens: int, *, peak: Peak, warmup: int,
               calls: int) -> dict:
    """Forward + backward (gradients w.r.t. the weights) of one width-``width`` block over
    ``[batch, tokens, width]``: compiled and analytic FLOPs, median time, GFLOP/s."""
    heads, mlp = max(1, width // 64), 4 * width
    shapes = dict(wq=(width, width), wk=(width, width), wv=(width, width), wo=(width, width),
                  w1=(width, mlp), w2=(mlp, width))
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    params = {name: jax.random.normal(key, shape, jnp.float32) * shape[0] ** -0.5
              for key, (name, shape) in zip(keys, shapes.items())}
    x = jax.random.normal(keys[-1], (batch, tokens, width), jnp.float32)
    step = jax.jit(jax.grad(lambda p, x: jnp.mean(_block(p, x, heads) ** 2)))
    start = time.perf_counter()
    compiled = step.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    flops = _cost_flops(compiled)
    matmul = sum(a * b for a, b in shapes.values())
    analytic = 3.0 * (2 * matmul * batch * tokens + 4 * tokens ** 2 * width * batch)
    return dict(width=width, mlp=mlp, heads=heads, batch=batch, tokens=tokens,
                compile_s=compile_s, flops=flops, analytic_flops=analytic,
                analytic_over_compiled=analytic / flops,
                **time_against_peak(lambda: jax.block_until_ready(compiled(params, x)), peak,
                                    warmup=warmup, calls=calls))


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def pixelllm_step(name: str, config, *, peak: Peak, warmup: int, calls: int) -> dict:
    """One PixelLLM train step: compiled and analytic FLOPs, compile time, median step time."""
    step = OurStep(name, config=config)
    params = {}
    for state in (step.state.params, step.frozen):
        for tower, count in matmul_params(state).items():
            params[tower] = params.get(tower, 0) + count
    analytic = analytic_flops(step.config, params)
    timing = time_against_peak(step.call, peak, warmup=warmup, calls=calls)
    return dict(config=name, remat=step.config.model.remat,
                batch=step.config.train.batch_size, canvas=step.config.data.sizes.canvas,
                compile_s=step.compile_s, flops=step.flops, analytic_flops=analytic["total"],
                analytic_per_tower=analytic["per_tower"], matmul_params=params,
                analytic_over_compiled=analytic["total"] / step.flops,
                parameters={module: dict(trained=t, frozen=f) for module, t, f in step.counts},
                examples_per_s=step.config.train.batch_size / timing["median_s"],
                first_step_metrics=step.first_metrics, **timing)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid", "block"],
                        choices=["tiny", "mid", "block"])
    parser.add_argument("--remat", nargs="+", default=["none", "full"],
                        help="remat policies to time the mid config with (first: model FLOPs)")
    parser.add_argument("--matmul", type=int, default=2048, help="N of the peak's N x N matmul")
    parser.add_argument("--block-width", type=int, default=1024)
    parser.add_argument("--block-batch", type=int, default=4)
    parser.add_argument("--block-tokens", type=int, default=256)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    timing = dict(peak=matmul_peak(args.matmul), warmup=args.warmup, calls=args.calls)

    rows = []
    # Remat policies whose step does not build or run: the error, instead of the figures.
    failures: dict[str, str] = {}
    if "block" in args.configs:
        rows.append(dict(name=f"bare block {args.block_width}", **bare_block(
            args.block_width, args.block_batch, args.block_tokens, **timing)))
    if "tiny" in args.configs:
        rows.append(dict(name="tiny", **pixelllm_step(TINY, None, **timing)))
    if "mid" in args.configs:
        model_flops = None
        for remat in args.remat:
            try:
                row = pixelllm_step(f"{TINY}_mid", mid_config(remat), **timing)
            except Exception as error:  # noqa: BLE001 - a policy that fails is a finding to report
                if model_flops is None:
                    raise
                failures[remat] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                print(f"mid, remat {remat}: failed: {failures[remat]}", flush=True)
                continue
            # Model FLOPs are the first policy's: recomputation is work, not progress.
            model_flops = model_flops or row["flops"]
            row.update(model_flops=model_flops,
                       gflops_per_s=model_flops / row["median_s"] / 1e9)
            rows.append(dict(name=f"mid, remat {remat}", **row))
    for row in rows:
        row.setdefault("model_flops", row["flops"])
        row.setdefault("gflops_per_s", row["model_flops"] / row["median_s"] / 1e9)
        row["utilization"] = row["gflops_per_s"] / row["peak_gflops_per_s"]
    peak_gflops = statistics.median(row["peak_gflops_per_s"] for row in rows)

    print(f"\nfloat32 {args.matmul}^2 matmul, interleaved with each config's calls; load "
          f"average {os.getloadavg()[0]:.1f}; median of {args.calls} calls after "
          f"{args.warmup} warm-up")
    header = (f"{'config':>18} {'compile s':>9} {'step s':>8} {'GFLOP':>9} {'analytic':>9} "
              f"{'GFLOP/s':>8} {'peak':>8} {'of peak':>8}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['name']:>18} {row['compile_s']:>9.1f} {row['median_s']:>8.3f} "
              f"{row['model_flops'] / 1e9:>9.1f} {row['analytic_over_compiled']:>8.2f}x "
              f"{row['gflops_per_s']:>8.1f} {row['peak_gflops_per_s']:>8.1f} "
              f"{row['utilization']:>8.1%}")

    device = jax.devices()[0]
    result = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                  python=platform.python_version(), load_average=os.getloadavg(),
                  dtype="float32", calls=args.calls, warmup=args.warmup,
                  peak=dict(n=args.matmul, gflops_per_s=peak_gflops), rows=rows,
                  remat_failures=failures,
                  mid_overrides=MID)
    results_file.write(result, f"flop_utilization_{device_name()}", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``: the bare block at width 128 and a small peak.
QUICK = ["--configs", "block", "--matmul", "256", "--block-width", "128", "--block-batch", "2",
         "--block-tokens", "32", "--calls", "2", "--warmup", "1"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows: the peak, then per config its step time, compile time, the
    analytic / compiled FLOP ratio and the utilization (issue 23's target: >= 40% of the peak
    for the mid config without remat)."""
    rows = [dict(measure=f"float32 matmul peak ({result['peak']['n']}^2), median over configs",
                 value=result["peak"]["gflops_per_s"], unit="GFLOP/s")]
    for row in result["rows"]:
        rows += [dict(measure=f"{row['name']}: step, median", value=row["median_s"], unit="s"),
                 dict(measure=f"{row['name']}: matmul peak beside it",
                      value=row["peak_gflops_per_s"], unit="GFLOP/s"),
                 dict(measure=f"{row['name']}: compile", value=row["compile_s"], unit="s"),
                 dict(measure=f"{row['name']}: model GFLOP per step",
                      value=row["model_flops"] / 1e9, unit="GFLOP"),
                 dict(measure=f"{row['name']}: analytic / compiled FLOPs",
                      value=row["analytic_over_compiled"], unit="x"),
                 dict(measure=f"{row['name']}: utilization of the matmul peak",
                      value=row["utilization"], unit="fraction",
                      target=(">=", 0.4) if row["name"] == "mid, remat none" else None)]
    rows += [dict(measure=f"mid, remat {remat}", value=f"fails: {error}", unit="")
             for remat, error in result.get("remat_failures", {}).items()]
    return rows


if __name__ == "__main__":
    main()
