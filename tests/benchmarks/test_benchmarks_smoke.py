"""Smoke tests of the benchmarks: each runs at its quick setting and writes its keys (no timings
are asserted: benchmarks are not timed tests)."""

import json

import numpy as np

from benchmarks import caption_speed, decode_speed, memory, run, sam_cache, task_speed
from pixelllm.language.tokenizer import load_tokenizer
from pixelllm.predictor import TRACE_PROMPT


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


def test_task_speed_quick_times_each_task_through_the_predictor(tmp_path):
    result = task_speed.main([*task_speed.QUICK, "--out", str(tmp_path / "task_speed.json")])

    written = json.loads((tmp_path / "task_speed.json").read_text())
    assert [(row["config"], row["task"], row["batch"]) for row in written["rows"]] == [
        ("tiny", "caption", 1), ("tiny", "caption", 2), ("tiny", "locate", 1),
        ("tiny", "locate", 2)]
    for row in written["rows"]:
        assert row["first_call_s"] > 0 and row["median_s"] > 0
        assert row["images_per_s"] == row["batch"] / row["median_s"]
    caption, _, locate, _ = written["rows"]
    # One caption per image, at most the 2 decoded tokens shown; a box has no text.
    assert caption["texts_per_image"] == 1 and 0 <= caption["shown_tokens_mean"] <= 2
    assert locate["shown_tokens_mean"] is None
    facts = written["configs"]["tiny"]
    assert facts["vocab_size"] == 128 and facts["parameters"] > 0
    # One compilation per task and batch bucket: timed calls never recompile.
    assert facts["traces"] == {"trace": 2, "refer": 2}
    measures = [row["measure"] for row in task_speed.table_rows(result)]
    assert measures == ["tiny caption: latency, batch 1", "tiny caption: first call (compile), "
                        "batch 1", "tiny caption: batch 2", "tiny locate: latency, batch 1",
                        "tiny locate: first call (compile), batch 1", "tiny locate: batch 2"]


def test_task_speed_requests_are_the_web_apps_jobs():
    jobs = task_speed.parse_jobs(list(task_speed.REQUESTS), width=64, height=48)

    assert {name: job.method for name, job in jobs.items()} == {
        "caption": "caption", "answer": "answer", "locate": "locate", "segment": "segment",
        "describe_box": "describe_region", "describe_points": "describe_region",
        "dense_caption": "dense_caption"}
    assert jobs["caption"].image.shape == (48, 64, 3)
    assert jobs["describe_box"].arguments["boxes"][0].tolist() == [16, 12, 48, 36]
    np.testing.assert_allclose(jobs["describe_points"].arguments["points"][0],
                               [[19.2, 24], [44.8, 24]], rtol=1e-6)


def test_task_speed_tokenizer_has_the_models_vocabulary(tmp_path):
    for bos, folder in ((False, tmp_path / "t5"), (True, tmp_path / "decoder")):
        folder.mkdir()
        tokenizer = load_tokenizer(task_speed.write_word_tokenizer(folder, vocab_size=300,
                                                                   bos=bos))
        assert tokenizer.vocab_size == 300
        assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 3 if bos else None)
        ids = tokenizer.encode(TRACE_PROMPT)
        # The prompts' words are in the vocabulary (none is the unknown token, id 2).
        assert 2 not in ids and tokenizer.decode(ids) == TRACE_PROMPT.strip()


def test_task_speed_configs_are_the_papers_and_the_mid_size_one():
    paper = task_speed.build_config("paper")
    assert paper.model.canvas_size == 384 and paper.model.language_model.kind == "t5"
    assert task_speed.vocabulary_size(paper) == 32128
    assert paper.model.sam.image_encoder.embed_dim == 1280
    assert paper.model.eva02.embed_dim == 1024
    mid = task_speed.build_config("mid")
    # flop_utilization's widths, with the heads segment and dense captioning need.
    assert mid.model.sam.image_encoder.embed_dim == 1280 and mid.model.eva02.depth == 2
    assert mid.model.mask_adapter is not None and mid.model.proposal_head is not None


def test_decode_speed_quick_times_both_schemes_in_full_per_batch(tmp_path):
    result = decode_speed.main([*decode_speed.QUICK, "--out", str(tmp_path / "decode.json")])

    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [(row["batch"], row["mode"]) for row in rows] == [(2, "cached"), (2, "recompute")]
    cached, recompute = rows
    assert cached["new_tokens"] == recompute["new_tokens"] == 8
    # Both decode every token (no extrapolation), so the two schemes give the same tokens.
    assert recompute["tokens_match_cached"] is True
    assert recompute["slowdown_vs_cached"] == recompute["latency_s"] / cached["latency_s"]
    assert recompute["tokens_per_s"] == 2 * 8 / recompute["latency_s"]
    measures = [row["measure"] for row in decode_speed.table_rows(result)]
    assert "cached speed-up over recompute, 8 tokens, batch 2" in measures


def test_caption_speed_quick_runs_ours_alone_and_says_so(tmp_path):
    result = caption_speed.main([*caption_speed.QUICK, "--out", str(tmp_path / "caption.json")])

    saved = json.loads((tmp_path / "caption.json").read_text())
    assert saved["official"] is None
    # L 10: the official loop's 8 tokens; greedy and beam search at batch 1.
    assert [(row["decode"], row["new_tokens"], row["batch"]) for row in saved["rows"]] == [
        ("greedy", 8, 1), ("beam2", 8, 1)]
    rows = caption_speed.table_rows(result)
    assert rows[-1]["value"] == "not run (--no-anchor)"
    assert not any(row.get("target") for row in rows)


def test_caption_speed_compares_batch_one_split_jit_rows_with_the_official():
    def ours(decode, length, path=caption_speed.SPLIT_JIT, batch=1, median=0.1):
        return dict(decode=decode, length=length, path=path, batch=batch, median_s=median,
                    min_s=median / 2)

    rows = [ours("greedy", 128), ours("greedy", 128, batch=8), ours("greedy", 128,
                                                                   path=caption_speed.NNX_JIT),
            ours("beam4", 32, median=0.05), ours("beam4", 128)]
    cases = [("greedy", 128, 1), ("greedy", 128, 8), ("beam4", 32, 1), ("beam4", 128, 1)]
    keys = caption_speed.anchor_keys(cases)
    assert keys == ["greedy_L128", "infer_L128", "beam4_L32", "beam4_L128"]
    timings = {key: dict(median_s=1.0 + i, min_s=0.5) for i, key in enumerate(keys)}

    comparisons = caption_speed.compare(rows, timings)
    by_key = {c["official"]: c for c in comparisons}
    # Only batch 1 through the split-state jit is compared, once per official measurement.
    assert len(comparisons) == len(by_key) == 4
    assert by_key["infer_L128"]["ratio"] == 2.0 / 0.1
    assert by_key["greedy_L128"]["ratio"] == 1.0 / 0.1
    assert by_key["beam4_L32"]["ratio"] == 3.0 / 0.05
    assert by_key["beam4_L32"]["ratio_of_min"] == 0.5 / 0.025
    # Targets: greedy like for like (infer_L128) and every beam row; the loop-alone greedy
    # comparison (ours also runs the encoders) has none.
    assert {key for key, c in by_key.items() if c["target"]} == {
        "infer_L128", "beam4_L32", "beam4_L128"}
    assert by_key["greedy_L128"]["official_loop_only"] and not by_key["infer_L128"][
        "official_loop_only"]


def test_sam_cache_quick_counts_fewer_step_flops_with_cached_features(tmp_path):
    result = sam_cache.main([*sam_cache.QUICK, "--out", str(tmp_path / "sam_cache.json")])
    (row,) = result["rows"]
    # The cached step leaves out SAM's image encoder: fewer FLOPs, and only those.
    assert 0 < row["cached_flops_per_image"] < row["uncached_flops_per_image"]
    assert 0 < row["flops_saved_fraction"] < 0.5
    assert row["entry_bytes_float16"] == 8 * 8 * 32 * 2
    assert json.loads((tmp_path / "sam_cache.json").read_text())["rows"] == result["rows"]
