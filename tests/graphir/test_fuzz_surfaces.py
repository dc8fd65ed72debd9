"""A short run of tools/fuzz.py's targets (the long runs are `python -m graphir.tools.fuzz`):
mutated IR is parsed or refused with a located ParseError; random builder calls record ops that
print back, or fail with a ValueError/TypeError naming the op."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from graphir.tools import fuzz

TEXTS = fuzz.seed_texts()
NAMES = fuzz.builder_names()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.randoms(use_true_random=False))
def test_parser_never_fails_uncleanly(rng):
    assert fuzz.parser_case(rng, TEXTS) is None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.randoms(use_true_random=False))
def test_builders_never_fail_uncleanly(rng):
    assert fuzz.builder_case(rng, NAMES) is None


@pytest.mark.parametrize("target", ["parser", "builders"])
def test_fuzz_command_reports_clean(target, capsys):
    assert fuzz.main(["--target", target, "--seconds", "2", "--seed", "7"]) == 0
    assert "0 findings" in capsys.readouterr().out


def test_a_finding_is_reported(monkeypatch, capsys):
    from graphir import ops

    def broken(x):
        raise KeyError("boom")  # the kind of failure the builders target exists to find

    monkeypatch.setattr(ops, "exp", broken)
    monkeypatch.setattr(fuzz, "builder_names", lambda: ["exp"])
    t = fuzz.run("builders", seconds=5, seed=0, max_cases=20)
    assert t.findings and all("ops.exp: KeyError" in f for f in t.findings)


def test_a_case_that_never_returns_is_stopped_and_reported(monkeypatch):
    def forever(rng):
        while True:   # what a loop on bad input looks like to the fuzzer
            pass

    monkeypatch.setattr(fuzz, "HANG_S", 0.2)
    monkeypatch.setattr(fuzz, "make_target", lambda name: forever)
    t = fuzz.run("builders", seconds=5, seed=0, max_cases=2)
    assert t.cases == 2 and t.findings == ["hang: a case ran past 0 s and was stopped"] * 2


def test_mutations_reach_the_bounds():
    rng = random.Random(3)
    texts = [fuzz.mutate_ir(TEXTS[0], rng) for _ in range(200)]
    assert any(len(t) > 2 * len(TEXTS[0]) for t in texts)  # deep nesting / long pieces happen
