"""Per-device memory of the train step at paper scale, on fake CPU devices.

For each model (``t5_xl``: the paper's SAM-H + EVA02-L + Flan-T5-XL; ``gemma2_2b``: the same
with the Gemma 2 2B decoder; ``mid``: benchmarks/flop_utilization.py's real-width, 2-layer
config in its own trace stage; ``tiny``: the tiny stage, for smoke runs) in a stage's training
config (default ``ref``: the paper's referring stage, batch 64), on meshes of ``--devices``
fake CPU devices (subprocesses with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``;
``--layout fsdp``: mesh ``(1, N, 1)``, parameters and batch split N ways; ``data``:
``(N, 1, 1)``, parameters replicated)::

    python -m benchmarks.memory                                    # exact state bytes only
    python -m benchmarks.memory --compile t5_xl:16:64 --timeout 3600  # + one compiled point
    python -m benchmarks.memory --models --compile mid:16:64       # compiles in minutes

Two paths:

* **exact, no compilation**: the model is built abstractly (``nnx.eval_shape``), split as the
  trainer splits it, the optimizer state derived with ``jax.eval_shape``, and every array's
  per-device shard shape read from its sharding (:func:`pixelllm.train.train_step.tree_shardings`):
  bytes of trained parameters, frozen parameters, optimizer state and the batch, per device.
* **compiled** (``--compile MODEL:DEVICES:BATCH``, each in its own process under
  ``--timeout``): ``jax.jit(step).lower(abstract inputs).compile().memory_analysis()`` of the
  trainer's step: arguments, outputs, aliased (donated) and temporary bytes per device; the
  temporaries are the activations and workspace. Its argument bytes are compared with the exact
  path's. The largest batch that fits ``--capacities`` (16 and 80 GB) assumes temporaries grow in
  proportion to the batch from the compiled point (marked ``extrapolated``).

Paper-scale compilation is slow on a small CPU (minutes per point). Prints a table and writes
``benchmarks/results/memory_<device>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from benchmarks import flop_utilization, results_file
from benchmarks.decode_speed import device_name
from configs import pixelllm as pixelllm_config
from configs import stages
from pixelllm import batch as batch_lib
from pixelllm import sharding
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.train import optimizer, trained_set
from pixelllm.train import train_step as train_step_lib

GB = 1e9
MODELS = ("t5_xl", "gemma2_2b", "mid", "tiny")


def stage_config(model: str, stage: str):
    """The stage's training config with ``model``'s language model, locked."""
    if model == "tiny":
        return stages.get_config(f"{stage}_tiny")
    if model == "mid":
        # Real widths, 2 layers per tower (benchmarks/flop_utilization.py); its own trace stage.
        return flop_utilization.mid_config("none")
    config = stages.get_config(stage)
    if model != "t5_xl":
        config.unlock()
        config.model.language_model = pixelllm_config.get_config(model).model.language_model
        config.init.language_model = ""
        config.lock()
    return config


def _bytes_per_device(tree, shardings) -> int:
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(leaves) != len(specs):
        raise ValueError(f"{len(leaves)} arrays but {len(specs)} shardings")
    # dtype.itemsize also covers PRNG key arrays (dropout keys: 8 bytes each).
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(leaves, specs))


def _mesh(devices: int, layout: str) -> Mesh:
    shape = (1, devices, 1) if layout == "fsdp" else (devices, 1, 1)
    return sharding.make_mesh(shape, jax.devices()[:devices])


def _build_abstract(model: str, stage: str, mesh: Mesh):
    """The trainer's split model, train state and optimizer, abstract (shapes only)."""
    config = stage_config(model, stage)
    rules = sharding.rules_from_config(config.sharding.rules)
    abstract = nnx.eval_shape(lambda: PixelLLM.from_config(
        config.model, rngs=nnx.Rngs(config.seed), mesh=mesh, rules=rules))
    trained = trained_set.trained_filter(abstract, tuple(config.frozen))
    graphdef, params, frozen = nnx.split(abstract, trained, ...)
    tx = optimizer.build(optimizer.OptimizerSettings.from_config(config.optimizer), params)
    state = jax.eval_shape(lambda p: train_step_lib.init_train_state(p, tx), params)
    return config, rules, graphdef, state, frozen, tx


def _state_record(config, rules, state, frozen, mesh: Mesh, batches: list[int]) -> dict:
    """Per-device bytes of the train state and of each batch size on ``mesh``."""
    sizes = batch_lib.Sizes(**config.data.sizes)
    shard = train_step_lib.tree_shardings
    record = dict(
        mesh_shape=dict(mesh.shape),
        trained_parameters=sum(x.size for x in jax.tree.leaves(state.params)),
        frozen_parameters=sum(x.size for x in jax.tree.leaves(frozen)),
        params_trained_bytes=_bytes_per_device(state.params, shard(state.params, mesh, rules)),
        params_frozen_bytes=_bytes_per_device(frozen, shard(frozen, mesh, rules)),
        opt_state_bytes=_bytes_per_device(state.opt_state, shard(state.opt_state, mesh, rules)),
        batch_bytes={})
    batch_sharding = train_step_lib.batch_shardings(mesh, rules)
    shards = train_step_lib.batch_shards(mesh, rules)
    for b in batches:
        if b % shards:
            # The batch axis does not split evenly: the trainer refuses such a batch.
            record["batch_bytes"][str(b)] = None
            continue
        spec = {key: jax.ShapeDtypeStruct(shape, dtype)
                for key, (shape, dtype) in batch_lib.batch_spec(sizes, b).items()}
        record["batch_bytes"][str(b)] = _bytes_per_device(spec,
                                                          {k: batch_sharding[k] for k in spec})
    record["state_bytes"] = (record["params_trained_bytes"] + record["params_frozen_bytes"]
                             + record["opt_state_bytes"])
    return record


def exact_bytes(model: str, stage: str, devices: list[int], layout: str,
                batches: list[int]) -> list[dict]:
    """Per-device bytes of the train state and the batch on each mesh size, from shapes and
    shardings alone (the model is built once: its shapes do not depend on the mesh)."""
    start = time.perf_counter()
    config, rules, _, state, frozen, _ = _build_abstract(model, stage, _mesh(max(devices), layout))
    build_s = time.perf_counter() - start
    return [dict(model=model, stage=stage, devices=count, layout=layout, build_s=build_s,
                 **_state_record(config, rules, state, frozen, _mesh(count, layout), batches))
            for count in devices]


def compiled_bytes(model: str, stage: str, devices: int, layout: str, batch: int) -> dict:
    """``memory_analysis()`` of the compiled train step at ``batch`` (bytes per device), with
    the exact count of the same point (``exact``) to compare with."""
    start = time.perf_counter()
    mesh = _mesh(devices, layout)
    config, rules, graphdef, state, frozen, tx = _build_abstract(model, stage, mesh)
    exact = dict(model=model, stage=stage, devices=devices, layout=layout,
                 **_state_record(config, rules, state, frozen, mesh, [batch]))
    step = train_step_lib.make_train_step(
        graphdef, state, frozen, tx=tx, mesh=mesh, rules=rules, loss_weights=config.loss,
        batch_size=batch, accumulation_steps=1, clip_norm=None, seed=config.seed)
    sizes = batch_lib.Sizes(**config.data.sizes)
    spec = {key: jax.ShapeDtypeStruct(shape, dtype)
            for key, (shape, dtype) in batch_lib.batch_spec(sizes, batch).items()}
    lowered = step.lower(state, frozen, spec)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    record = {field.removesuffix("_size_in_bytes") + "_bytes": int(getattr(stats, field))
              for field in fields}
    # Donated outputs reuse their arguments' buffers: count them once.
    record["total_bytes"] = (record["argument_bytes"] + record["output_bytes"]
                             - record["alias_bytes"] + record["temp_bytes"])
    return dict(model=model, stage=stage, devices=devices, layout=layout, batch=batch,
                lower_s=lower_s, compile_s=time.perf_counter() - start - lower_s, exact=exact,
                **record)


def _worker(spec: dict, out: pathlib.Path) -> None:
    kind = spec.pop("kind")
    record = exact_bytes(**spec) if kind == "exact" else compiled_bytes(**spec)
    out.write_text(json.dumps(record))


def _in_subprocess(spec: dict, *, devices: int, timeout: float | None,
                   optimize: bool = False) -> dict | list[dict]:
    """``spec`` run by a fresh process with ``devices`` fake CPU devices; compiled
    without LLVM's optimization of the CPU code unless ``optimize`` (buffer assignment, hence
    the memory figures, is decided before it; it is a large part of a CPU compile's time)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS=str(int(not optimize)),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "record.json"
        command = [sys.executable, "-m", "benchmarks.memory", "--worker", json.dumps(spec),
                   "--worker-out", str(out)]
        start = time.perf_counter()
        try:
            subprocess.run(command, check=True, timeout=timeout, env=env,
                           cwd=pathlib.Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            return dict(spec, timed_out_after_s=time.perf_counter() - start)
        return json.loads(out.read_text())


def largest_batch(exact: dict, compiled: dict, capacity: float) -> int:
    """The largest batch (a multiple of the compiled point's per-device split) whose state,
    batch and temporaries fit ``capacity`` bytes, temporaries and batch taken as proportional
    to the batch from the compiled point."""
    batch = compiled["batch"]
    per_example = (compiled["temp_bytes"] + exact["batch_bytes"][str(batch)]) / batch
    fixed = exact["state_bytes"]
    if fixed >= capacity:
        return 0
    shards = exact["mesh_shape"]["data"] * exact["mesh_shape"]["fsdp"]
    return int((capacity - fixed) / per_example) // shards * shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["t5_xl", "gemma2_2b"], choices=MODELS,
                        help="models for the exact path (none: only the --compile points)")
    parser.add_argument("--stage", default="ref", help="configs/stages.py stage (default ref)")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--layout", choices=["fsdp", "data"], default="fsdp")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODEL:DEVICES:BATCH",
                        help="points to compile (memory_analysis), each in its own process")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per compiled point before giving up")
    parser.add_argument("--optimize", action="store_true",
                        help="compile with LLVM optimization (same memory figures, slower)")
    parser.add_argument("--capacities", type=float, nargs="+", default=[16.0, 80.0],
                        help="device memory sizes in GB for the largest-batch estimate")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker), args.worker_out)

    points = []
    for point in args.compile:
        try:
            model, devices, batch = point.split(":")
            points.append((model, int(devices), int(batch)))
        except ValueError:
            parser.error(f"--compile {point!r}: expected MODEL:DEVICES:BATCH")
        if model not in MODELS:
            parser.error(f"--compile {point!r}: model must be one of {MODELS}")

    # One process per model, run side by side (each mostly traces Python: one core each).
    with concurrent.futures.ThreadPoolExecutor(max(1, len(args.models))) as pool:
        per_model = pool.map(lambda model: _in_subprocess(
            dict(kind="exact", model=model, stage=args.stage, devices=args.devices,
                 layout=args.layout, batches=args.batches), devices=max(args.devices),
            timeout=None), args.models)
        exact = [record for records in per_model for record in records]
    compiled = [_in_subprocess(dict(kind="compiled", model=model, stage=args.stage,
                                    devices=devices, layout=args.layout, batch=batch),
                               devices=devices, timeout=args.timeout, optimize=args.optimize)
                for model, devices, batch in points]

    print(f"\nper-device GB, stage {args.stage}, layout {args.layout}, float32 (exact: shapes "
          "and shardings, no compilation)")
    header = (f"{'model':>10} {'devices':>7} {'trained':>8} {'frozen':>8} {'optimizer':>9} "
              f"{'state':>7} " + " ".join(f"{'batch ' + str(b):>10}" for b in args.batches))
    print(header + "\n" + "-" * len(header))
    for r in exact:
        print(f"{r['model']:>10} {r['devices']:>7} {r['params_trained_bytes'] / GB:>8.2f} "
              f"{r['params_frozen_bytes'] / GB:>8.2f} {r['opt_state_bytes'] / GB:>9.2f} "
              f"{r['state_bytes'] / GB:>7.2f} " + " ".join(
                  f"{r['batch_bytes'][str(b)] / GB:>10.3f}" if r["batch_bytes"][str(b)] is not None
                  else f"{'-':>10}" for b in args.batches))
    for c in compiled:
        if "timed_out_after_s" in c:
            print(f"compiled {c['model']} on {c['devices']} devices, batch {c['batch']}: "
                  f"not finished in {c['timed_out_after_s']:.0f} s")
            continue
        match = c["exact"]
        expected = match["state_bytes"] + match["batch_bytes"][str(c["batch"])]
        c["argument_over_exact"] = c["argument_bytes"] / expected
        c["largest_batch_extrapolated"] = {
            f"{capacity:g}GB": largest_batch(match, c, capacity * GB)
            for capacity in args.capacities}
        print(f"compiled {c['model']} on {c['devices']} devices, batch {c['batch']} "
              f"(compile {c['compile_s']:.0f} s): arguments {c['argument_bytes'] / GB:.2f} GB "
              f"({c['argument_over_exact']:.3f}x the exact count), temporaries "
              f"{c['temp_bytes'] / GB:.2f} GB, total {c['total_bytes'] / GB:.2f} GB; largest "
              "batch (extrapolated) " + ", ".join(
                  f"{k}: {v}" for k, v in c["largest_batch_extrapolated"].items()))

    result = dict(stage=args.stage, layout=args.layout, dtype="float32", batches=args.batches,
                  llvm_optimized=args.optimize,
                  capacities_gb=args.capacities, load_average=os.getloadavg(),
                  jax=jax.__version__, exact=exact, compiled=compiled)
    results_file.write(result, f"memory_{device_name()}", args.out)
    return result


# A smoke setting for ``benchmarks.run --quick``: the tiny stage's exact bytes on 2 fake devices
# (compiling even the tiny step takes minutes on a small shared CPU).
QUICK = ["--models", "tiny", "--devices", "2", "--batches", "4"]


def table_rows(result: dict) -> list[dict]:
    """``benchmarks.run``'s rows: per model and mesh the per-device state bytes; per compiled
    point its total and the largest batch that fits (issue 23's target: the referring stage at
    batch 64 fits 16 GB devices on a 16-device mesh)."""
    rows = [dict(measure=f"{r['model']} on {r['devices']} devices ({r['layout']}): parameters + "
                         "optimizer state per device", value=r["state_bytes"] / GB, unit="GB")
            for r in result["exact"]]
    for c in result["compiled"]:
        name = f"{c['model']} on {c['devices']} devices, batch {c['batch']}"
        if "timed_out_after_s" in c:
            rows.append(dict(measure=f"{name}: compilation", value="timed out", unit=""))
            continue
        rows.append(dict(measure=f"{name}: compiled step, per device", value=c["total_bytes"] / GB,
                         unit="GB", target=("<=", 16.0) if (c["model"], c["devices"],
                                                            c["batch"]) == ("t5_xl", 16, 64)
                         else None))
        rows.append(dict(measure=f"{name}: temporaries (activations), per device",
                         value=c["temp_bytes"] / GB, unit="GB"))
        rows += [dict(measure=f"{c['model']} on {c['devices']} devices: largest batch in "
                              f"{capacity} (extrapolated)", value=batch, unit="examples")
                 for capacity, batch in c["largest_batch_extrapolated"].items()]
    return rows


if __name__ == "__main__":
    main()
