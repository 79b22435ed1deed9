"""Property-based tests (Hypothesis) for every parser of untrusted bytes.

Any byte string, and any mutation of an honest input, gives a result or one of our
StargzfsErrors with a documented exit code and a one-line message: never another exception.
The long mode (`scripts/fuzz.py`) runs the same contract over 100k+ cases per parser and
records time and memory per case (docs/reliability.md).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.fuzzing import PARSERS, mutate, outcome

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(PARSERS))
@SETTINGS
@given(data=st.binary(max_size=4096))
def test_any_bytes_give_a_result_or_our_error(name: str, data: bytes) -> None:
    outcome(PARSERS[name], data)


@pytest.mark.parametrize("name", sorted(PARSERS))
@SETTINGS
@given(rng=st.randoms(use_true_random=False), pick=st.integers(min_value=0))
def test_mutated_honest_inputs_give_a_result_or_our_error(name: str, rng: random.Random, pick: int) -> None:
    seeds = PARSERS[name].seeds()
    outcome(PARSERS[name], mutate(rng, seeds[pick % len(seeds)]))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_honest_seeds_parse(name: str) -> None:
    """The seeds are valid inputs, or the mutations above would prove little."""
    for seed in PARSERS[name].seeds():
        assert outcome(PARSERS[name], seed) == "ok"
