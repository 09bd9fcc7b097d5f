"""What the SAM feature cache saves at paper scale: the train step's FLOPs with and without it.

With ``config.data.sam_feature_cache`` on, batches carry SAM's features and the step does not run
SAM's image encoder (frozen, so it never had a backward pass). For each stage, the paper's model
(SAM-H + EVA02-L + Flan-T5-XL, ``benchmarks.memory``'s ``t5_xl``) is built abstractly and the
trainer's step is lowered for one device at ``--batch`` (no compilation, no weights): the FLOPs
of XLA's cost analysis of the lowered step, uncached and cached, per image. Per-step time at the
harness's sizes, where SAM is small, is ``benchmarks.train_step``'s ``*_cached`` modes; a
store entry's size is ``F x F x C`` values in the store's dtype::

    python -m benchmarks.sam_cache                        # trace, ref, densecap; batch 1
    python -m benchmarks.sam_cache --stages ref --batch 2

Lowering the paper's model traces it in Python: about a minute per stage and mode on a 2-core
CPU. Prints a table and writes ``benchmarks/results/sam_cache_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import platform
import time

import jax

from benchmarks import memory, results_file
from benchmarks.decode_speed import device_name
from pixelllm import batch as batch_lib
from pixelllm.train import train_step as train_step_lib

STAGES = ("trace", "ref", "densecap")


def step_flops(model: str, stage: str, batch: int) -> dict:
    """FLOPs of the lowered train step of ``model`` in ``stage`` at ``batch`` on one device,
    without and with cached SAM features, and the store entry's size."""
    mesh = memory._mesh(1, "data")
    config, rules, graphdef, state, frozen, tx = memory._build_abstract(model, stage, mesh)
    sizes = batch_lib.Sizes(**config.data.sizes)
    encoder = config.model.sam.image_encoder
    grid, channels = sizes.canvas // encoder.patch_size, encoder.out_chans
    record = dict(model=model, stage=stage, batch=batch, canvas=sizes.canvas,
                  entry_bytes_float16=grid * grid * channels * 2)
    for cached in (False, True):
        start = time.perf_counter()
        step = train_step_lib.make_train_step(
            graphdef, state, frozen, tx=tx, mesh=mesh, rules=rules, loss_weights=config.loss,
            batch_size=batch, accumulation_steps=1, clip_norm=None, seed=config.seed,
            cached_sam_features=cached)
        step_sizes = (dataclasses.replace(sizes, sam_grid=grid, sam_channels=channels)
                      if cached else sizes)
        spec = {key: jax.ShapeDtypeStruct(shape, dtype)
                for key, (shape, dtype) in batch_lib.batch_spec(step_sizes, batch).items()}
        cost = step.lower(state, frozen, spec).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        name = "cached" if cached else "uncached"
        record[f"{name}_flops_per_image"] = float(cost["flops"]) / batch
        record[f"{name}_lower_s"] = time.perf_counter() - start
    record["flops_saved_fraction"] = 1.0 - (record["cached_flops_per_image"]
                                            / record["uncached_flops_per_image"])
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="t5_xl", choices=memory.MODELS)
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    rows = [step_flops(args.model, stage, args.batch) for stage in args.stages]
    print(f"\ntrain step TFLOP per image, {args.model}, lowered at batch {args.batch} (XLA cost "
          "analysis, no compilation)")
    header = f"{'stage':>9} {'canvas':>6} {'SAM run':>8} {'SAM cached':>10} {'saved':>6} {'entry':>9}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['stage']:>9} {r['canvas']:>6} {r['uncached_flops_per_image'] / 1e12:>8.3f} "
              f"{r['cached_flops_per_image'] / 1e12:>10.3f} {r['flops_saved_fraction']:>6.1%} "
              f"{r['entry_bytes_float16'] / 1024:>6.0f} KiB")
    result = dict(device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform,
                  jax=jax.__version__, python=platform.python_version(), rows=rows)
    results_file.write(result, f"sam_cache_{device_name()}", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``: the tiny stage.
QUICK = ["--model", "tiny", "--stages", "trace"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows: per stage, the share of the step's FLOPs the cache saves."""
    return [dict(measure=f"{r['model']} {r['stage']}: train-step FLOPs saved by the SAM cache",
                 value=r["flops_saved_fraction"], unit="fraction") for r in result["rows"]]


if __name__ == "__main__":
    main()
