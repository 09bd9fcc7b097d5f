"""Caption metrics of the COCO caption toolkit (pycocoevalcap): METEOR 1.5, CIDEr-D, BLEU-1..4,
ROUGE-L, on PTB-tokenized text.

METEOR and the PTB tokenizer run on Java. METEOR loads a 60 MB paraphrase table at start (seconds
to tens of seconds), so one :class:`MeteorProcess` keeps one JVM for a whole evaluation: it
starts on the first score request and ends with :meth:`MeteorProcess.close` (or the ``with``
block). Per-pair METEOR (DenseCap scores each (candidate, references) pair) and corpus METEOR
(the captioning tables) go through the same process. Without ``java`` on PATH every entry raises
:class:`JavaNotFoundError` naming the Debian package that provides it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

JAVA_DEBIAN_PACKAGE = "default-jre-headless"


class JavaNotFoundError(RuntimeError):
    """``java`` is not on PATH (METEOR and the PTB tokenizer need it)."""


class PairScorer(Protocol):
    """Scores each candidate against its own references (DenseCap's use of METEOR)."""

    def score_pairs(self, candidates: Sequence[str],
                    references: Sequence[Sequence[str]]) -> np.ndarray:
        """``[N]`` candidates and ``[N]`` reference lists -> ``[N]`` float64 scores, in order."""
        ...


def require_java(purpose: str) -> str:
    """The path of ``java``, or :class:`JavaNotFoundError` saying what needed it."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            f"{purpose} runs on Java, and no `java` executable is on PATH. Install a Java "
            f"runtime (Debian/Ubuntu: `sudo apt-get install {JAVA_DEBIAN_PACKAGE}`) or put its "
            "bin/ folder on PATH.")
    return java


def clean_text(text: str) -> str:
    """One line with single spaces: both Java tools read one sentence per line, so a newline
    inside a caption would shift every later result."""
    return " ".join(str(text).split())


def _check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                 where: str) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{where}: {len(candidates)} candidates but {len(references)} "
                         "reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"{where}: references[{i}] must be a non-empty list of strings, "
                             f"got {refs!r}")


class MeteorProcess:
    """One METEOR 1.5 JVM (``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm``, as
    pycocoevalcap and DenseCap run it), started on first use and reused until :meth:`close`.

    Per-item scores are METEOR's segment scores, independent of which other pairs are scored in
    the same request; the corpus score aggregates the statistics of all pairs (not the mean of
    the per-item scores).
    """

    def __init__(self):
        self._meteor: Meteor | None = None

    def __enter__(self) -> MeteorProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Ends the JVM (if it was started); a later request starts a new one."""
        self._end()

    def _end(self) -> str:
        """Ends the JVM; returns the tail of what it wrote to stderr."""
        if self._meteor is None:
            return ""
        meteor, self._meteor = self._meteor, None
        # A request that failed midway leaves pycocoevalcap's lock held; its __del__ (at garbage
        # collection) takes the lock again and would block forever.
        if meteor.lock.locked():
            meteor.lock.release()
        process = meteor.meteor_p
        with contextlib.suppress(OSError):  # a pipe to a process that already ended
            process.stdin.close()
        process.kill()
        process.wait()
        errors = process.stderr.read().decode(errors="replace")[-2000:]
        process.stdout.close()
        process.stderr.close()
        return errors

    def score(self, candidates: Sequence[str],
              references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
        """``(corpus METEOR, [N] per-pair METEOR)`` of N candidates against their references.

        Raises:
          ValueError: no pairs, mismatched lengths or an empty reference list.
          JavaNotFoundError: ``java`` is not on PATH.
        """
        _check_pairs(candidates, references, where="METEOR")
        if not candidates:
            raise ValueError("METEOR: no (candidate, references) pair to score")
        meteor = self._process()
        ids = range(len(candidates))
        hypotheses = {i: [clean_text(candidates[i])] for i in ids}
        # pycocoevalcap removes the field separator "|||" from hypotheses only.
        refs = {i: [clean_text(r).replace("|||", "") for r in references[i]] for i in ids}
        try:
            corpus, per_item = meteor.compute_score(refs, hypotheses)
        except (ValueError, OSError) as error:  # no number / a closed pipe: the JVM ended
            exit_code = meteor.meteor_p.poll()
            raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) stopped answering (exit code "
                               f"{exit_code}); its stderr: {self._end()}") from error
        return float(corpus), np.asarray(per_item, np.float64)

    def score_pairs(self, candidates: Sequence[str],
                    references: Sequence[Sequence[str]]) -> np.ndarray:
        """``[N]`` per-pair METEOR (:class:`PairScorer`); no pairs: an empty array, no JVM."""
        if not candidates and not references:
            return np.zeros((0,), np.float64)
        return self.score(candidates, references)[1]

    def _process(self) -> Meteor:
        if self._meteor is None:
            require_java("METEOR 1.5 (pycocoevalcap)")
            self._meteor = Meteor()
        return self._meteor


def ptb_tokenize(texts: Sequence[Sequence[str]]) -> list[list[str]]:
    """PTB-tokenizes (Stanford CoreNLP 3.4.1, lower-cased, punctuation removed, as the COCO
    caption toolkit) each group of captions; groups and their order are kept.

    Empty captions stay empty (they are not sent: the tokenizer reads one caption per line).
    """
    require_java("The PTB tokenizer (pycocoevalcap)")
    cleaned = [[clean_text(t) for t in group] for group in texts]
    to_tokenize = {i: [{"caption": t} for t in group if t]
                   for i, group in enumerate(cleaned)}
    to_tokenize = {i: group for i, group in to_tokenize.items() if group}
    tokenized = PTBTokenizer().tokenize(to_tokenize) if to_tokenize else {}
    result = []
    for i, group in enumerate(cleaned):
        tokens = iter(tokenized.get(i, []))
        result.append([next(tokens, None) if t else "" for t in group])
        if None in result[-1] or next(tokens, None) is not None:
            raise RuntimeError(f"the PTB tokenizer returned a different number of captions for "
                               f"group {i} ({group!r})")
    return result


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                    meteor: MeteorProcess) -> dict[str, float]:
    """The COCO caption metrics of N candidates, each against its own references.

    Candidates and references are PTB-tokenized first. Scores are fractions as pycocoevalcap
    returns them (the paper prints METEOR, CIDEr, ... x 100).

    Returns:
      ``METEOR`` (corpus METEOR 1.5), ``CIDEr`` (CIDEr-D: IDF from these references),
      ``BLEU-1`` .. ``BLEU-4``, ``ROUGE-L``.
    """
    _check_pairs(candidates, references, where="caption_metrics")
    if not candidates:
        raise ValueError("caption_metrics: no candidate to score")
    tokenized = ptb_tokenize([[c] for c in candidates] + [list(r) for r in references])
    count = len(candidates)
    hypotheses = {i: tokenized[i] for i in range(count)}
    refs = {i: tokenized[count + i] for i in range(count)}
    bleu, _ = Bleu(4).compute_score(refs, hypotheses, verbose=0)
    cider, _ = Cider().compute_score(refs, hypotheses)
    rouge, _ = Rouge().compute_score(refs, hypotheses)
    corpus_meteor, _ = meteor.score([h[0] for h in hypotheses.values()], list(refs.values()))
    metrics = {"METEOR": corpus_meteor, "CIDEr": float(cider)}
    metrics.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    metrics["ROUGE-L"] = float(rouge)
    return metrics
