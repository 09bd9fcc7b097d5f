"""Parsing a command line into a tool's own absl flag registry inside a test."""

import sys
from collections.abc import Callable, Iterator

import pytest
from absl import flags


def parsed_flags(flag_values: flags.FlagValues, monkeypatch: pytest.MonkeyPatch,
                 program: str) -> Iterator[Callable[..., None]]:
    """Yields ``parse(*argv)``, which parses ``argv`` into ``flag_values`` (an ml_collections
    config flag reads its overrides from ``sys.argv``, so the command line goes there too);
    unparses the flags afterwards. For a fixture: ``yield from parsed_flags(...)``."""

    def parse(*argv):
        monkeypatch.setattr(sys, "argv", [program, *argv])
        flag_values.unparse_flags()
        flag_values(sys.argv)

    yield parse
    flag_values.unparse_flags()
