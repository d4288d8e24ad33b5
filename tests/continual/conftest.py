"""Fixtures of the continual tests: the tiny GPT is trained once per session (a few seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lm():
    from tests.unlearn.lm_helpers import lm_problem

    return lm_problem()
