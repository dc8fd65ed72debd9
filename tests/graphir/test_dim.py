"""Symbolic dimensions: construction, algebra, canonical form, printing and parsing."""
import pytest
from hypothesis import given, settings, strategies as st

from graphir import Dim
from graphir.dim import parse_dim


def test_static_and_symbolic_construction():
    assert Dim(4096).is_static and int(Dim(4096)) == 4096
    n = Dim("total_seq_len")
    assert not n.is_static and n.symbols == {"total_seq_len"}
    assert Dim(n) == n and Dim(Dim(3)) == 3
    assert Dim("batch+1") == Dim("batch") + 1


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (True, TypeError), (1.5, TypeError),
                                      ("a b", ValueError), ("", ValueError), ("nan", ValueError),
                                      ("f32", ValueError)])
def test_bad_construction(bad, exc):
    with pytest.raises(exc):
        Dim(bad)


def test_symbolic_has_no_int():
    with pytest.raises(TypeError, match="symbolic"):
        int(Dim("n"))


def test_algebra_and_canonical_order():
    n, m = Dim("n"), Dim("m")
    assert n + 1 == 1 + n
    assert 2 * n == n * 2 == n + n
    assert n * m == m * n
    assert (n + 1) * 2 == 2 * n + 2
    assert (n + 1) - 1 == n
    assert n - n == 0
    assert 5 - Dim(2) == 3
    assert (n + m) * (n - m) == n * n - m * m
    assert hash(n * m + 1) == hash(1 + m * n)
    assert str(2 * n + 1) == "2*n+1"
    assert str(n - 3) == "n-3"
    assert str(n * m + n + 7) == "n+m*n+7"
    assert str(-n + 4) == "-n+4"
    assert str(Dim(0)) == "0"
    assert repr(Dim("n") + 1) == "Dim('n+1')" and repr(Dim(3)) == "Dim(3)"


def test_floordiv_and_exact_div():
    n = Dim("n")
    assert (4 * n + 8) // 4 == n + 2
    assert Dim(7) // 2 == 3
    with pytest.raises(ValueError, match="not divisible"):
        (2 * n + 1) // 2
    with pytest.raises(ValueError):
        n // 0
    assert (4 * n * Dim("m")).exact_div(n) == 4 * Dim("m")
    assert (6 * n).exact_div(4) is None
    assert (n + 1).exact_div(n) is None
    assert Dim(12).exact_div(4) == 3


def test_evaluate():
    d = 2 * Dim("a") * Dim("b") + Dim("a") - 3
    assert d.evaluate({"a": 5, "b": 7}) == 2 * 35 + 5 - 3
    with pytest.raises(KeyError):
        d.evaluate({"a": 1})


def test_equality_with_ints_and_strings():
    assert Dim(4) == 4 and Dim(4) != 5
    assert Dim("n") == "n" and Dim("n") != "m"
    assert Dim("n+1") == "1+n"
    assert (Dim(4) == "not a dim!") is False
    assert Dim("n").__eq__(1.5) is NotImplemented


@pytest.mark.parametrize("text, env, want", [
    ("batch+1", {"batch": 3}, 4),
    ("2*n", {"n": 5}, 10),
    ("n*m-3", {"n": 2, "m": 4}, 5),
    ("(a+1)*2", {"a": 3}, 8),
    ("-n+10", {"n": 4}, 6),
    ("(4*n)/2", {"n": 8}, 16),
])
def test_parse_dim(text, env, want):
    assert parse_dim(text).evaluate(env) == want


@pytest.mark.parametrize("text", ["", "n+", "(n+1", "n)", "n $ 1", "2**n", "n/2"])
def test_parse_dim_rejects(text):
    with pytest.raises(ValueError):
        parse_dim(text)


_names = st.sampled_from(["n", "m", "batch", "seq_len"])
_dims = st.recursive(
    st.one_of(st.integers(0, 50).map(Dim), _names.map(Dim)),
    lambda inner: st.one_of(st.builds(lambda a, b: a + b, inner, inner),
                            st.builds(lambda a, b: a * b, inner, inner),
                            st.builds(lambda a, k: a * k, inner, st.integers(0, 5))),
    max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(_dims, st.fixed_dictionaries({k: st.integers(0, 9) for k in ["n", "m", "batch", "seq_len"]}))
def test_print_parse_round_trip_and_value(d, env):
    back = parse_dim(str(d))
    assert back == d and str(back) == str(d)
    assert back.evaluate(env) == d.evaluate(env)
