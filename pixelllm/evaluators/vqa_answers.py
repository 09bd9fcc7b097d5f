"""VQA-style answer evaluation: exact match after the standard VQA answer normalisation.

The normalisation is the official VQA evaluation's (``vqaEval.py`` of the VQA API,
github.com/GT-Vision-Lab/VQA), applied to both the predicted and the reference answer:

1. newlines and tabs become spaces, the ends are stripped;
2. ``processPunctuation``: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted
   when the text has it next to a space, or holds a digit-comma-digit group anywhere (so
   ``"2,000"`` becomes ``"2000"``), and is replaced by a space otherwise (``"black/white"`` ->
   ``"black white"``); then a period not followed by a digit is deleted (``"3.5"`` keeps
   its point). The official passes ``re.UNICODE`` where ``re.sub`` takes ``count``, so at most
   32 periods are deleted; that is kept, since official scores were computed with it;
3. ``processDigitArticle``: lower-cased, split on whitespace, number words ``none``, ``zero``
   .. ``ten`` become digits (``"none"`` -> ``"0"``), the articles ``a``, ``an``, ``the`` are
   dropped, and apostrophe-less contractions get their apostrophes (``"dont"`` -> ``"don't"``,
   ``"wouldnt've"`` -> ``"wouldn't've"``); the words are joined by single spaces.

The official applies step 2 and 3 to the prediction and its ten references only when the
references disagree; instruction data has one reference per question, so both are always
normalised here (as every later VQA-style evaluation does).

Keys of :meth:`VqaAnswerEvaluator.result`: ``exact_match`` (fraction), ``num_items``,
``num_duplicates_skipped``.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence

from pixelllm.evaluators.results_file import write_results

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# The official pattern, "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead (a typo for a
# look-behind) that never blocks a period, so a period is deleted unless a digit follows.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# re.UNICODE's value, which the official passes as re.sub's count.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (module docstring, step 2)."""
    out = text
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle`` (module docstring, step 3)."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it (module docstring, steps 1-3)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


class VqaAnswerEvaluator:
    """Accumulates (prediction, reference answer) items of one split and scores exact match.

    Args:
      split: the split's name, written to the JSON (e.g. ``"sharegpt4v/heldout"``).
    """

    def __init__(self, *, split: str):
        self.split = split
        self._matches: dict[str, bool] = {}
        self._duplicates = 0

    def __len__(self) -> int:
        """Number of items added."""
        return len(self._matches)

    def add(self, *, item_ids: Sequence[int | str], predictions: Sequence[str],
            answers: Sequence[str]) -> None:
        """Adds N items; an item id added before is skipped (evaluation padding may repeat
        examples).

        Args:
          item_ids: ``[N]`` unique ids (e.g. ``"<entry>/<turn>"``).
          predictions: ``[N]`` generated answers.
          answers: ``[N]`` reference answers.
        """
        where = f"VqaAnswerEvaluator({self.split!r})"
        if not len(item_ids) == len(predictions) == len(answers):
            raise ValueError(f"{where}: {len(item_ids)} item_ids, {len(predictions)} "
                             f"predictions and {len(answers)} answers differ in length")
        for item_id, prediction, answer in zip(item_ids, predictions, answers):
            if not (isinstance(prediction, str) and isinstance(answer, str)):
                raise ValueError(f"{where} item {item_id!r}: prediction and answer must be "
                                 f"strings, got {prediction!r} and {answer!r}")
            key = str(item_id)
            if key in self._matches:
                self._duplicates += 1
                continue
            self._matches[key] = exact_match(prediction, answer)

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys)."""
        if not self._matches:
            raise ValueError(f"VqaAnswerEvaluator({self.split!r}): no item was added")
        return {"exact_match": sum(self._matches.values()) / len(self._matches),
                "num_items": float(len(self._matches)),
                "num_duplicates_skipped": float(self._duplicates)}

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "metrics"}`` to ``path`` (parent folders created)."""
        write_results(path, {"split": self.split, "metrics": self.result()})
