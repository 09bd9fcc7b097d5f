"""How often the official and the exact word-trace alignments disagree over a Localized
Narratives jsonl file (``data_pipelines/alignment.py`` holds both rules).

    python -m pixelllm.tools.alignment_report --jsonl FILE [--limit N] [--tokenizer PATH]

Run from the repository root (``data_pipelines`` is read from there). Malformed lines and
narratives are counted and named, never fatal; the summary ends the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from data_pipelines.alignment import NarrativeTraces, disagreement
from data_pipelines.builders.localized_narratives import (MALFORMED_JSON, BadNarrativeError,
                                                          parse_narrative)
from data_pipelines.skips import SkipCounter
from pixelllm.language.tokenizer import load_tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pixelllm.tools.alignment_report",
        description="How often the official and exact word-trace alignments give a word "
                    "token different utterances, over the narratives of a Localized "
                    "Narratives jsonl file.")
    parser.add_argument("--jsonl", required=True, help="Localized Narratives jsonl file")
    parser.add_argument("--limit", type=int, default=None, help="read at most N lines")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer file or folder (pixelllm.language.load_tokenizer); "
                             "default: one token per whitespace word")
    args = parser.parse_args(argv)

    tokenizer = None if args.tokenizer is None else load_tokenizer(args.tokenizer)

    skips = SkipCounter(policy="skip", logger_name=__name__)
    narratives = differing = compared = word_tokens = 0
    with open(args.jsonl, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if args.limit is not None and line_number > args.limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # also UnicodeDecodeError
                skips.bad(MALFORMED_JSON, file=args.jsonl, record=f"line {line_number}",
                          detail=f"not valid JSON: {error}")
                continue
            try:
                narrative = parse_narrative(record)
            except BadNarrativeError as error:
                skips.bad(error.reason, file=args.jsonl, record=f"line {line_number}",
                          detail=str(error))
                continue
            traces = NarrativeTraces(caption=narrative.caption, utterances=narrative.texts,
                                     boxes=narrative.boxes, points=narrative.points,
                                     valid=narrative.valid, start_times=narrative.start_times,
                                     end_times=narrative.end_times,
                                     trace_xy=narrative.trace_xy, trace_t=narrative.trace_t)
            if tokenizer is None:
                word_index = np.arange(len(narrative.caption.split()))
            else:
                word_index = np.asarray(tokenizer.encode_with_alignment(narrative.caption)[1])
            narrative_differing, narrative_compared = disagreement(traces, word_index=word_index)
            narratives += 1
            differing += narrative_differing
            compared += narrative_compared
            word_tokens += int((word_index >= 0).sum())

    rate = differing / compared if compared else float("nan")
    print(f"narratives: {narratives}")
    print(f"word tokens: {word_tokens}, with a target under both rules: {compared}")
    print(f"official vs exact utterance disagreement: {differing}/{compared} = {rate:.4f}")
    print(skips.summary())


if __name__ == "__main__":
    main(sys.argv[1:])
