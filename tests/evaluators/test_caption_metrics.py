"""The caption metrics on the real pycocoevalcap (Java METEOR and PTB tokenizer)."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from pixelllm.evaluators import caption_metrics as cm

REFERENCES = [["a man riding a brown horse on the beach", "a person on a horse"],
              ["a red car parked next to the street", "red car on a road"],
              ["two dogs playing with a ball in the grass"]]


def test_perfect_candidates_score_higher_than_wrong_ones(meteor):
    perfect = cm.caption_metrics([refs[0] for refs in REFERENCES], REFERENCES, meteor=meteor)
    wrong = cm.caption_metrics(["a bowl of soup", "the sky at night", "an old clock tower"],
                               REFERENCES, meteor=meteor)
    assert set(perfect) == {"METEOR", "CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
                            "ROUGE-L"}
    for key in perfect:
        assert perfect[key] > wrong[key] + 0.1, key
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["METEOR"] > 0.9
    assert wrong["BLEU-4"] < 1e-6


def test_per_pair_meteor_count_order_and_independence(meteor):
    candidates = ["a red car parked next to the street", "a cat", "two dogs playing"]
    scores = meteor.score_pairs(candidates, REFERENCES)
    assert scores.shape == (3,) and scores.dtype == np.float64
    assert scores[0] == pytest.approx(0.0, abs=0.05)  # the car caption against the horse refs
    assert scores[2] > 0.1
    reversed_scores = meteor.score_pairs(candidates[::-1], REFERENCES[::-1])
    np.testing.assert_array_equal(reversed_scores, scores[::-1])
    # A pair's score does not depend on the other pairs of the request (DenseCap scores pairs).
    alone = meteor.score_pairs(candidates[2:], REFERENCES[2:])
    assert alone[0] == scores[2]
    assert meteor.score_pairs([], []).shape == (0,)


def test_newlines_do_not_shift_the_line_protocol(meteor):
    scores = meteor.score_pairs(["two dogs\nplaying with a ball", "a red car"],
                                [["two dogs playing with a\nball"], ["a red car"]])
    assert scores == pytest.approx([1.0, 1.0], abs=1e-6)


def test_corpus_meteor_is_not_the_mean_of_pairs(meteor):
    corpus, per_pair = meteor.score(["a red car", "two dogs playing in the grass"],
                                    [["a red car parked next to the street"],
                                     ["two dogs playing with a ball in the grass"]])
    assert per_pair.shape == (2,)
    assert corpus != pytest.approx(float(per_pair.mean()), abs=1e-6)


def test_one_shared_process(meteor, monkeypatch):
    meteor.score_pairs(["a cat"], [["a cat"]])  # started (by this or an earlier test)

    def second_jvm():
        raise AssertionError("a second METEOR JVM was started")

    monkeypatch.setattr(cm, "Meteor", second_jvm)
    meteor.score_pairs(["a dog"], [["a dog"]])
    cm.caption_metrics(["a dog", "a cat"], [["a dog"], ["a cat"]], meteor=meteor)


def test_ptb_tokenization_lowercases_and_drops_punctuation():
    assert cm.ptb_tokenize([["A Dog, running!", ""], ["It's 3 p.m."]]) == [
        ["a dog running", ""], ["it 's 3 p.m."]]


def test_missing_java_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    process = cm.MeteorProcess()
    with pytest.raises(cm.JavaNotFoundError, match="default-jre-headless"):
        process.score_pairs(["a cat"], [["a cat"]])
    with pytest.raises(cm.JavaNotFoundError, match="PTB tokenizer.*default-jre-headless"):
        cm.ptb_tokenize([["a cat"]])
    assert process.score_pairs([], []).shape == (0,)  # nothing to score needs no Java
    process.close()


def test_bad_pairs_are_refused_before_java_starts():
    process = cm.MeteorProcess()
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        process.score_pairs(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        process.score_pairs(["a"], [[]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        cm.caption_metrics(["a"], ["a"], meteor=process)


def test_a_dead_meteor_process_gives_its_stderr_and_is_replaced(monkeypatch):
    starts, real_meteor = [], cm.Meteor

    def dying_meteor():
        # pycocoevalcap's Meteor speaking to a process that fails like a JVM out of memory.
        meteor = real_meteor.__new__(real_meteor)
        meteor.meteor_p = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stderr.write('OutOfMemoryError'); sys.exit(3)"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        meteor.lock = threading.Lock()
        starts.append(meteor)
        return meteor

    monkeypatch.setattr(cm, "Meteor", dying_meteor)
    process = cm.MeteorProcess()
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match="stopped answering.*OutOfMemoryError"):
            process.score_pairs(["a cat"], [["a cat"]])
        assert len(starts) == attempt and not starts[-1].lock.locked()
    process.close()
