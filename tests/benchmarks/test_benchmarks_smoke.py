"""Smoke tests of the benchmarks: each runs at its quick setting and writes its keys (no timings
are asserted: benchmarks are not timed tests)."""

import json

from benchmarks import memory, run


def test_run_quick_writes_results_json_and_table(tmp_path):
    run.main(["--only", "flop_utilization", "--quick", "--results-dir", str(tmp_path)])

    merged = json.loads((tmp_path / "cpu.json").read_text())
    entry = merged["benchmarks"]["flop_utilization"]
    assert entry["quick"] is True
    assert {"load_average", "cpu_count", "jax", "device"} <= set(entry["machine"])
    result = entry["result"]
    assert result["peak"]["gflops_per_s"] > 0
    (block,) = result["rows"]
    assert block["flops"] > 0 and block["median_s"] > 0 and block["compile_s"] > 0
    # The analytic count of the block's matmuls and attention is the compiled count within 15%.
    assert 0.85 < block["analytic_over_compiled"] < 1.15
    assert block["utilization"] > 0
    assert (tmp_path / "flop_utilization_cpu.json").exists()
    table = (tmp_path / "RESULTS.md").read_text()
    assert "flop_utilization (quick)" in table and "utilization of the matmul peak" in table


def test_verdict_says_by_how_much_a_target_is_missed():
    assert run.verdict(dict(value=0.5, target=("<=", 0.6))) == "met"
    assert run.verdict(dict(value=0.9, target=("<=", 0.6))) == "missed: 1.50x too high"
    assert run.verdict(dict(value=5.0, target=(">=", 10.0))) == "missed: 2.00x too low"
    assert run.verdict(dict(value=5.0)) == ""


def test_memory_quick_counts_state_bytes_per_device(tmp_path):
    result = memory.main([*memory.QUICK, "--out", str(tmp_path / "memory.json")])

    (record,) = json.loads((tmp_path / "memory.json").read_text())["exact"]
    assert record["mesh_shape"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert record["state_bytes"] == (record["params_trained_bytes"]
                                     + record["params_frozen_bytes"] + record["opt_state_bytes"])
    # float32 parameters over 2 devices: each holds at least half of them, at most all.
    total = 4 * record["trained_parameters"]
    assert total / 2 <= record["params_trained_bytes"] <= total
    # Adam keeps two moments per trained parameter (plus scalar counts).
    assert record["opt_state_bytes"] >= 2 * record["params_trained_bytes"]
    assert record["batch_bytes"]["4"] > 0
    assert memory.table_rows(result)
