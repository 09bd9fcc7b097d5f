"""Runs the registered benchmarks, merges their results with the machine's facts, prints one table.

    python -m benchmarks.run                                  # every benchmark, full settings
    python -m benchmarks.run --only flop_utilization,memory   # some of them
    python -m benchmarks.run --only memory --quick --results-dir bench_smoke  # a smoke run

Each benchmark is a module of this package with ``main(argv) -> dict`` (its own CLI), a
``QUICK`` argv (a setting that runs in seconds to a minute: a smoke run, not a measurement) and
``table_rows(result) -> list[dict]``: one row per figure, ``measure``, ``value``, ``unit`` and,
where the project has a target, ``target`` as ``("<=" | ">=", threshold)``. Every figure is
measured by the benchmark itself (medians after warm-up, compile time apart, comparisons as
ratios measured in the same run).

Writes, under ``--results-dir`` (default ``benchmarks/results``), each benchmark's own JSON
(``<name>_<device>.json``) and ``<device>.json``: the latest result of every benchmark ever run
there on this device, each with the machine facts and load average of its own run (a run with
``--only`` replaces those benchmarks' entries and keeps the others'). The table of that merged file
is printed and written to ``--results-md`` (default ``benchmarks/RESULTS.md``, or
``RESULTS.md`` inside ``--results-dir`` when one is given).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys

import jax

from benchmarks.decode_speed import device_name

BENCHMARKS = ("train_step", "decode_speed", "caption_speed", "input_pipeline", "flop_utilization",
              "memory", "task_speed", "sam_cache")
PACKAGE = pathlib.Path(__file__).parent


def machine_facts() -> dict:
    """What the figures depend on besides the code: the device, the CPUs and how busy they are."""
    device = jax.devices()[0]
    return dict(device=device.device_kind, platform=device.platform,
                device_count=jax.device_count(),
                cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)),
                processor=platform.processor() or platform.machine(),
                load_average=list(os.getloadavg()), jax=jax.__version__,
                python=platform.python_version(), host=platform.node(),
                measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))


def verdict(row: dict) -> str:
    """'met' or how far the value is from its target, as the factor between them."""
    if row.get("target") is None:
        return ""
    op, threshold = row["target"]
    value = row["value"]
    met = value <= threshold if op == "<=" else value >= threshold
    if met:
        return "met"
    factor = value / threshold if op == "<=" else threshold / value
    return f"missed: {factor:.2f}x too {'high' if op == '<=' else 'low'}"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def pipeline_rows(merged: dict) -> list[dict]:
    """The input pipeline's best examples/s over each train step's consumption (batch / median
    step time, from flop_utilization): issue 23's target, >= 1 (never the bottleneck). The two
    are separate runs (their load columns say how comparable)."""
    benchmarks = merged["benchmarks"]
    if "input_pipeline" not in benchmarks or "flop_utilization" not in benchmarks:
        return []
    pipeline = benchmarks["input_pipeline"]["result"]
    supply = max(row["examples_per_s"] for row in pipeline["rows"])
    return [dict(measure=f"pipeline ({pipeline['sizes']['canvas']} canvas, {pipeline['cores']} "
                         f"cores) / {row['name']} step consumption ({row['canvas']} canvas, "
                         f"batch {row['batch']})",
                 value=supply / row["examples_per_s"], unit="x", target=(">=", 1.0))
            for row in benchmarks["flop_utilization"]["result"]["rows"]
            if "examples_per_s" in row]


def table(merged: dict) -> str:
    """The merged results as one Markdown table (a row per figure) with each run's load."""
    lines = ["| benchmark | measure | value | unit | target | vs target | load (1 min) |",
             "|---|---|---:|---|---|---|---:|"]
    entries = [(name + (" (quick)" if entry["quick"] else ""), entry["machine"]["load_average"][0],
                entry["rows"]) for name, entry in merged["benchmarks"].items()]
    comparisons = pipeline_rows(merged)
    if comparisons:
        load = merged["benchmarks"]["input_pipeline"]["machine"]["load_average"][0]
        entries.append(("input vs step", load, comparisons))
    for label, load, rows in entries:
        for row in rows:
            target = " ".join(map(_format, row["target"])) if row.get("target") else ""
            lines.append(f"| {label} | {row['measure']} | {_format(row['value'])} | "
                         f"{row.get('unit', '')} | {target} | {verdict(row)} | {load:.1f} |")
    return "\n".join(lines)


def results_markdown(merged: dict, source: str) -> str:
    """RESULTS.md: the machines the results were measured on, then :func:`table`; ``source``
    names the merged JSON file."""
    machines = {}
    for name, entry in merged["benchmarks"].items():
        m = entry["machine"]
        machines.setdefault((m["device"], m["processor"], m["cpu_count"], m["cpus_usable"],
                             m["jax"], m["host"]), []).append(f"{name} {m['measured_at']}")
    described = "\n".join(
        f"- {device} ({processor}), {cpus} CPUs ({usable} usable), jax {jax_version}, host "
        f"{host}: {', '.join(runs)}"
        for (device, processor, cpus, usable, jax_version, host), runs in machines.items())
    return (f"# Benchmark results: {merged['device']}\n\n"
            "Written by `python -m benchmarks.run` (do not edit by hand): the latest result of "
            f"each benchmark, from `{source}`. Medians after "
            "warm-up, compile time apart; ratios are measured within one run. The load column "
            "is the 1-minute load average when the benchmark started: other work on the same "
            "CPUs slows every figure.\n\nMeasured on:\n" + described + "\n\n" + table(merged)
            + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated names out of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="each benchmark's smoke setting (seconds; not a measurement)")
    parser.add_argument("--results-dir", type=pathlib.Path, default=None,
                        help="where the JSON files go (default benchmarks/results)")
    parser.add_argument("--results-md", type=pathlib.Path, default=None,
                        help="the table's Markdown file (default benchmarks/RESULTS.md, or "
                        "RESULTS.md in --results-dir)")
    args = parser.parse_args(argv)
    names = [name for name in args.only.split(",") if name]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    results_dir = args.results_dir or PACKAGE / "results"
    results_md = args.results_md or (results_dir / "RESULTS.md" if args.results_dir
                                     else PACKAGE / "RESULTS.md")
    device = device_name()
    merged_path = results_dir / f"{device}.json"

    def read_merged() -> dict:
        return (json.loads(merged_path.read_text()) if merged_path.exists()
                else dict(device=device, benchmarks={}))

    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        machine = machine_facts()
        print(f"\n== {name}{' (quick)' if args.quick else ''}, load average "
              f"{machine['load_average'][0]:.1f} ==", flush=True)
        own_json = results_dir / f"{name}_{device}.json"
        result = module.main([*(module.QUICK if args.quick else []), "--out", str(own_json)])
        # Read again: another run may have written its benchmarks meanwhile. Written after
        # each benchmark, so a later one failing keeps the figures already measured.
        merged = read_merged()
        merged["benchmarks"][name] = dict(quick=args.quick, machine=machine,
                                          load_average_after=list(os.getloadavg()),
                                          rows=module.table_rows(result), result=result)
        results_dir.mkdir(parents=True, exist_ok=True)
        merged_path.write_text(json.dumps(merged, indent=2) + "\n")
    merged = read_merged()
    results_md.parent.mkdir(parents=True, exist_ok=True)
    try:
        source = merged_path.resolve().relative_to(PACKAGE.parent)
    except ValueError:
        source = merged_path
    results_md.write_text(results_markdown(merged, str(source)))
    print("\n" + table(merged))
    print(f"\nwrote {merged_path} and {results_md}", file=sys.stderr)
    return merged


if __name__ == "__main__":
    main()
