"""Counting (or refusing) bad records while building a data set.

Public annotation dumps hold a few broken records among millions: a truncated JSON line, an
empty caption, an image that fails to decode. A builder must neither crash on the first one after
hours of work nor drop them silently. :class:`SkipCounter` gives both policies one call site:

* ``"skip"`` (the builders' default): the record is left out, counted under a short reason, and
  logged (the first few per reason in full, so the cause can be found; then only counted). The
  builder prints :meth:`SkipCounter.summary` at the end of each split (printed, not logged:
  default logging hides INFO), so the loss is visible.
* ``"fail"``: the first bad record raises :class:`BadRecordError` naming the file and the record,
  for debugging a new dump or a converter.
"""

from __future__ import annotations

import collections
import logging

POLICIES = ("skip", "fail")
# Full warnings per reason before switching to counting only.
_WARNINGS_PER_REASON = 5


class BadRecordError(ValueError):
    """A record that cannot be used, under the ``"fail"`` policy; names the file and record."""


class SkipCounter:
    """Applies a bad-record policy and counts the skipped records per reason.

    Args:
      policy: ``"skip"`` to count and continue, ``"fail"`` to raise on the first bad record.
      logger_name: the ``logging`` logger that warnings and the summary go to.
    """

    def __init__(self, *, policy: str = "skip", logger_name: str = __name__):
        if policy not in POLICIES:
            raise ValueError(f"unknown bad-record policy {policy!r}; expected one of {POLICIES}")
        self.policy = policy
        self._logger = logging.getLogger(logger_name)
        self._counts: collections.Counter[str] = collections.Counter()

    def bad(self, reason: str, *, file: str, record: str, detail: str) -> None:
        """Reports one bad record.

        Args:
          reason: a short, fixed category (``"empty caption"``); counts are kept per reason.
          file: the file holding the record.
          record: which record (``"line 12"``, ``"image 391895"``).
          detail: what is wrong with it.

        Raises:
          BadRecordError: under the ``"fail"`` policy, ``f"{file}: {record}: {detail}"``.
        """
        message = f"{file}: {record}: {detail}"
        if self.policy == "fail":
            raise BadRecordError(message)
        self._counts[reason] += 1
        count = self._counts[reason]
        if count <= _WARNINGS_PER_REASON:
            self._logger.warning("skipped (%s): %s", reason, message)
            if count == _WARNINGS_PER_REASON:
                self._logger.warning("further records skipped for %r are only counted", reason)

    def counts(self) -> dict[str, int]:
        """Skipped records per reason."""
        return dict(self._counts)

    @property
    def total(self) -> int:
        """Skipped records over all reasons."""
        return sum(self._counts.values())

    def summary(self) -> str:
        """A table of skipped records per reason, most frequent first, with the total."""
        if not self._counts:
            return "no records skipped"
        rows = self._counts.most_common()
        width = max(len(reason) for reason, _ in rows + [("total", 0)])
        lines = [f"skipped records ({self.policy} policy):"]
        lines += [f"  {reason:<{width}}  {count:>8d}" for reason, count in rows]
        lines.append(f"  {'total':<{width}}  {self.total:>8d}")
        return "\n".join(lines)
