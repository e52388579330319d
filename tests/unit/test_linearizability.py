"""The per-key WGL checker (syncmap.testing.linearizability): MAP_MODEL semantics, closed
intervals, indeterminate operations, the witness text, and the history formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from syncmap.testing.formats import (
    HistoryFormatError,
    Keyword,
    detect_format,
    load,
    parse_edn,
    parse_jepsen_kv,
    parse_jepsen_register,
    read_history,
    write_history,
)
from syncmap.testing.linearizability import (
    ABSENT,
    FAILED,
    KV_MODEL,
    MAP_MODEL,
    REGISTER_MODEL,
    UNKNOWN,
    Operation,
    check,
    freeze,
)
from syncmap.testing.scenarios_checker import corrupt_late_read, simulate_register


def op(p: int, f: str, inp: object, out: object, call: int, ret: int | None, key: str = "k"):
    return Operation(p, key, f, inp, out, call, ret)


def seq(*steps: tuple[str, object, object]) -> list[Operation]:
    """A sequential history (one op after the other, no overlap)."""
    return [op(1, f, i, o, 10 * n, 10 * n + 5) for n, (f, i, o) in enumerate(steps)]


def verdict(ops: list[Operation], **kw: object) -> str:
    return check(ops, **kw).verdict  # type: ignore[arg-type]


# ---- MAP_MODEL, one operation kind at a time ---------------------------------------------------


def test_get_of_a_missing_key_is_absent() -> None:
    assert MAP_MODEL.step(ABSENT, "get", None, ABSENT) == (True, ABSENT)
    assert MAP_MODEL.step(ABSENT, "get", None, None) == (False, ABSENT)  # None is a value
    assert verdict(seq(("get", None, ABSENT))) == "linearizable"
    assert verdict(seq(("get", None, "x"))) == "not linearizable"


def test_set_then_get() -> None:
    assert MAP_MODEL.step("a", "set", "b", None) == (True, "b")
    assert verdict(seq(("set", "a", None), ("get", None, "a"))) == "linearizable"
    assert verdict(seq(("set", "a", None), ("set", "b", None), ("get", None, "a"))) == (
        "not linearizable"
    )


def test_swap_returns_the_previous_value() -> None:
    assert MAP_MODEL.step(ABSENT, "swap", "a", ABSENT) == (True, "a")
    assert MAP_MODEL.step("a", "swap", "b", "a") == (True, "b")
    assert MAP_MODEL.step("a", "swap", "b", ABSENT)[0] is False
    ok = seq(("swap", "a", ABSENT), ("swap", "b", "a"), ("get", None, "b"))
    assert verdict(ok) == "linearizable"
    assert verdict(seq(("swap", "a", ABSENT), ("swap", "b", ABSENT))) == "not linearizable"


def test_delete_says_whether_the_key_existed() -> None:
    assert MAP_MODEL.step("a", "delete", None, True) == (True, ABSENT)
    assert MAP_MODEL.step(ABSENT, "delete", None, False) == (True, ABSENT)
    assert MAP_MODEL.step(ABSENT, "delete", None, True)[0] is False
    ok = seq(("set", "a", None), ("delete", None, True), ("delete", None, False),
             ("get", None, ABSENT))  # fmt: skip
    assert verdict(ok) == "linearizable"
    assert verdict(seq(("set", "a", None), ("delete", None, False))) == "not linearizable"


def test_cas_succeeds_iff_the_value_matches() -> None:
    assert MAP_MODEL.step("a", "cas", ("a", "b"), True) == (True, "b")
    assert MAP_MODEL.step("a", "cas", ("x", "b"), False) == (True, "a")
    assert MAP_MODEL.step("a", "cas", ("x", "b"), True)[0] is False
    assert MAP_MODEL.step("a", "cas", ("a", "b"), False)[0] is False
    assert MAP_MODEL.step("a", "cas", ("a", "b"), UNKNOWN) == (True, "b")
    ok = seq(("set", "a", None), ("cas", ("x", "b"), False), ("cas", ("a", "b"), True),
             ("get", None, "b"))  # fmt: skip
    assert verdict(ok) == "linearizable"
    assert verdict(seq(("set", "a", None), ("cas", ("a", "b"), True), ("get", None, "a"))) == (
        "not linearizable"
    )


def test_compare_and_delete() -> None:
    assert MAP_MODEL.step("a", "cad", "a", True) == (True, ABSENT)
    assert MAP_MODEL.step("a", "cad", "b", False) == (True, "a")
    assert MAP_MODEL.step(ABSENT, "cad", "a", True)[0] is False
    ok = seq(("set", "a", None), ("cad", "b", False), ("cad", "a", True), ("get", None, ABSENT))
    assert verdict(ok) == "linearizable"
    assert verdict(seq(("set", "a", None), ("cad", "a", True), ("get", None, "a"))) == (
        "not linearizable"
    )


def test_setdefault_returns_the_existing_value_or_installs_its_own() -> None:
    assert MAP_MODEL.step(ABSENT, "setdefault", "a", "a") == (True, "a")
    assert MAP_MODEL.step("b", "setdefault", "a", "b") == (True, "b")
    assert MAP_MODEL.step("b", "setdefault", "a", "a")[0] is False
    assert MAP_MODEL.step(ABSENT, "setdefault", "a", ABSENT)[0] is False
    ok = seq(("setdefault", "a", "a"), ("setdefault", "b", "a"), ("get", None, "a"))
    assert verdict(ok) == "linearizable"
    assert verdict(seq(("setdefault", "a", "a"), ("setdefault", "b", "b"))) == "not linearizable"


def test_unknown_operation_is_an_error() -> None:
    with pytest.raises(ValueError, match="no operation 'frobnicate'"):
        check(seq(("frobnicate", None, None)))


def test_register_and_kv_models() -> None:
    assert REGISTER_MODEL.init() is None
    assert REGISTER_MODEL.step(None, "read", None, None) == (True, None)
    assert REGISTER_MODEL.step(1, "cas", (1, 2), True) == (True, 2)
    assert KV_MODEL.init() == ""
    assert KV_MODEL.step("ab", "append", "c", None) == (True, "abc")
    assert KV_MODEL.step("ab", "put", "z", None) == (True, "z")


def test_list_and_dict_values_are_frozen_for_the_memo() -> None:
    value = {"a": [1, 2, {"b": None}], "c": "d"}
    assert freeze(value) == freeze({"c": "d", "a": (1, 2, {"b": None})})
    assert hash(freeze(value)) == hash(freeze(json.loads(json.dumps(value))))
    ops = seq(("set", value, None), ("get", None, json.loads(json.dumps(value))),
              ("cas", (value, [1]), True), ("get", None, [1]))  # fmt: skip
    assert verdict(ops) == "linearizable"
    assert verdict(seq(("set", [1, 2], None), ("get", None, [2, 1]))) == "not linearizable"


# ---- real time, closed intervals, indeterminacy -------------------------------------------------


def test_concurrent_ops_may_take_effect_in_either_order() -> None:
    ops = [op(1, "set", "a", None, 0, 100), op(2, "get", None, ABSENT, 10, 20),
           op(3, "get", None, "a", 30, 40), op(4, "get", None, ABSENT, 50, 60)]  # fmt: skip
    assert verdict(ops) == "not linearizable"  # absent after a was seen
    assert verdict(ops[:3]) == "linearizable"


def test_intervals_are_closed() -> None:
    """A read called at the very nanosecond a write returned may still precede it."""
    touching = [op(1, "set", "a", None, 0, 10), op(2, "get", None, ABSENT, 10, 20)]
    assert verdict(touching) == "linearizable"
    apart = [op(1, "set", "a", None, 0, 10), op(2, "get", None, ABSENT, 11, 20)]
    assert verdict(apart) == "not linearizable"


def test_an_indeterminate_write_may_land_late_or_never() -> None:
    w1, w2 = op(1, "set", "a", None, 0, 10), op(2, "set", "b", UNKNOWN, 20, None)
    late = [w1, w2, op(3, "get", None, "a", 100, 110), op(3, "get", None, "b", 900, 910)]
    assert verdict(late) == "linearizable"
    never = [w1, w2, op(3, "get", None, "a", 900, 910)]
    assert verdict(never) == "linearizable"
    flicker = [w1, w2, op(3, "get", None, "b", 100, 110), op(3, "get", None, "a", 200, 210)]
    assert verdict(flicker) == "not linearizable"


def test_unknown_output_means_ret_is_infinite() -> None:
    """Even with a return time recorded, an op whose outcome is unknown may land later."""
    ops = [op(1, "set", "b", UNKNOWN, 0, 5), op(2, "get", None, ABSENT, 10, 20),
           op(2, "get", None, "b", 30, 40)]  # fmt: skip
    assert verdict(ops) == "linearizable"


def test_failed_mutations_and_unknown_reads_are_dropped() -> None:
    ops = [op(1, "set", "zz", FAILED, 0, 5), op(2, "get", None, UNKNOWN, 1, None),
           op(3, "get", None, ABSENT, 10, 20)]  # fmt: skip
    result = check(ops)
    assert result.verdict == "linearizable"
    assert result.per_key[0].ops == 1
    # A read of the failed write's value is a read of a value nobody wrote.
    bad = [*ops, op(3, "get", None, "zz", 30, 40)]
    assert verdict(bad) == "not linearizable"
    assert verdict(bad, precheck=False) == "not linearizable"


def test_a_return_before_the_call_is_rejected() -> None:
    with pytest.raises(ValueError, match="returns before it is called"):
        check([op(1, "set", "a", None, 10, 5)])


def test_keys_are_independent_and_workers_agree() -> None:
    ops = [op(1, "set", "a", None, 0, 10, key="x"), op(2, "get", None, ABSENT, 20, 30, key="y"),
           op(3, "get", None, "a", 20, 30, key="x")]  # fmt: skip
    assert verdict(ops) == "linearizable"
    many = []
    for k in range(6):
        hist = simulate_register(60, 3, seed=k, key=f"k{k}")
        many += corrupt_late_read(hist) if k == 4 else hist
    one, two = check(many, workers=1), check(many, workers=2)
    assert (one.verdict, one.keys, one.keys_failed, one.failed_keys) == (
        "not linearizable", 6, 1, ["k4"])  # fmt: skip
    assert (two.verdict, two.keys, two.keys_failed, two.failed_keys) == (
        "not linearizable", 6, 1, ["k4"])  # fmt: skip
    assert one.witness == two.witness


# ---- the witness --------------------------------------------------------------------------------


def test_witness_of_a_stale_read() -> None:
    """set a; set b; get -> a, all sequential: the read cannot be placed after set b."""
    ops = [op(1, "set", "a", None, 0, 10), op(2, "set", "b", None, 20, 30),
           op(3, "get", None, "a", 40, 50)]  # fmt: skip
    result = check(ops, precheck=False)
    print(result.witness)
    assert result.verdict == "not linearizable"
    assert result.keys_failed == 1 and result.failed_keys == ["k"]
    lines = result.witness.splitlines()
    assert lines[0].startswith("key 'k': not linearizable (3 ops, 0 never returned")
    assert lines[1] == (
        "The longest partial linearization places 2 of 3 ops; after it the state is 'b', "
        "and this op cannot be placed before it returns:"
    )
    assert lines[2] == "  #2 p3 get() -> 'a'   [call 40, ret 50]"
    assert "  #2 p3 get() -> 'a'   [call 40, ret 50]   not possible in state 'b'" in lines
    order = lines[lines.index("The partial linearization, in order (state after each op):") + 1 :]
    assert order == ["  #0 p1 set('a')   [call 0, ret 10]   -> 'a'",
                     "  #1 p2 set('b')   [call 20, ret 30]   -> 'b'"]  # fmt: skip


def test_witness_shows_why_each_candidate_fails() -> None:
    ops = [op(1, "set", "a", None, 0, 10), op(2, "get", None, "c", 20, 40),
           op(3, "get", None, "d", 20, 40)]  # fmt: skip
    result = check(ops, precheck=False)
    print(result.witness)
    assert result.verdict == "not linearizable"
    assert "places 1 of 3 ops; after it the state is 'a'" in result.witness
    assert "this op cannot be placed before it returns:\n  #1 p2 get() -> 'c'" in result.witness
    assert "  #1 p2 get() -> 'c'   [call 20, ret 40]   not possible in state 'a'\n" in (
        result.witness
    )
    assert "  #2 p3 get() -> 'd'   [call 20, ret 40]   not possible in state 'a'\n" in (
        result.witness
    )


def test_precheck_witness_names_the_impossible_read() -> None:
    ops = [op(1, "set", "a", None, 0, 10), op(3, "get", None, "b", 40, 50),
           op(2, "set", "b", UNKNOWN, 60, None)]  # fmt: skip
    result = check(ops)
    assert result.verdict == "not linearizable"
    assert "observes 'b', but every operation that could write it was called after it" in (
        result.witness
    )
    assert check(ops, precheck=False).verdict == "not linearizable"


def test_unknown_names_the_key_and_never_claims_linearizable() -> None:
    ops = corrupt_late_read(simulate_register(200, 16, seed=5))
    result = check(ops, budget_s=0.05, precheck=False)
    assert result.verdict == "unknown"
    assert result.keys_unknown == 1 and result.unknown_keys == ["k"]
    assert "budget of 0.05 s ran out" in result.witness
    assert result.seconds < 2


# ---- formats ------------------------------------------------------------------------------------


def test_syncmap_history_round_trip(tmp_path: Path) -> None:
    ops = [op(1, "set", {"a": [1, 2]}, None, 0, 10), op(2, "get", None, ABSENT, 5, 8),
           op(3, "cas", (ABSENT, "x"), UNKNOWN, 12, None), op(4, "set", "q", FAILED, 13, 14),
           op(5, "swap", "y", {"a": [1, 2]}, 20, 30)]  # fmt: skip
    path = tmp_path / "h.jsonl"
    assert write_history(ops, path) == 5
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["ok", "ok", "info", "fail", "ok"]
    assert records[1]["output"] == {"$absent": True}
    assert records[2]["ret_ns"] is None
    back = read_history(path)
    assert back[1].output is ABSENT and back[2].output is UNKNOWN and back[3].output is FAILED
    assert back[2].input == [ABSENT, "x"] and back[2].ret_ns is None
    assert back[0].input == {"a": [1, 2]}
    assert detect_format(path.read_text()) == "syncmap"
    loaded, model = load(path)
    assert model is MAP_MODEL and loaded == back
    assert check(loaded).verdict == "linearizable"


def test_jepsen_register_parsing() -> None:
    text = (
        "INFO  jepsen.util - 0\t:invoke\t:write\t1\n"
        "INFO  jepsen.util - 0\t:ok\t:write\t1\n"
        "INFO  jepsen.util - 1   :invoke :cas    [1 2]\n"
        "INFO  jepsen.util - 2\t:invoke\t:read\tnil\n"
        "INFO  jepsen.util - 1\t:fail\t:cas\t[1 2]\n"
        "INFO  jepsen.util - 2\t:fail\t:read\t:timed-out\n"
        "INFO  jepsen.util - 3\t:invoke\t:write\t4\n"
        "INFO  jepsen.util - 3\t:info\t:write\t:timed-out\n"
        "INFO  jepsen.util - 4\t:invoke\t:read\tnil\n"
        "INFO  jepsen.util - 4\t:ok\t:read\t1\n"
        "INFO  jepsen.util - 5\t:invoke\t:cas\t[1 3]\n"
    )
    assert detect_format(text) == "jepsen-register"
    ops, model = parse_jepsen_register(text)
    assert model is REGISTER_MODEL
    got = [(o.process, o.f, o.input, o.output, o.call_ns, o.ret_ns) for o in ops]
    assert got == [
        (0, "write", 1, None, 1, 2),
        (1, "cas", (1, 2), False, 3, 5),  # a failed cas is a definite false
        (2, "read", None, UNKNOWN, 4, None),  # a timed-out read: unknown
        (3, "write", 4, UNKNOWN, 7, None),  # info: indeterminate
        (4, "read", None, 1, 9, 10),
        (5, "cas", (1, 3), UNKNOWN, 11, None),  # never completed
    ]
    assert check(ops, model).verdict == "not linearizable"  # cas [1 2] failed while it held 1


def test_jepsen_kv_parsing() -> None:
    text = (
        '{:process 0, :type :invoke, :f :append, :key "1", :value "x 0 0 y"}\n'
        '{:process 1, :type :invoke, :f :get, :key "1", :value nil}\n'
        '{:process 0, :type :ok, :f :append, :key "1", :value "x 0 0 y"}\n'
        '{:process 1, :type :ok, :f :get, :key "1", :value "x 0 0 y"}\n'
    )
    assert detect_format(text) == "jepsen-kv"
    ops, model = parse_jepsen_kv(text)
    assert model is KV_MODEL
    assert [(o.key, o.f, o.input, o.output) for o in ops] == [
        ("1", "append", "x 0 0 y", None), ("1", "get", None, "x 0 0 y")]  # fmt: skip
    assert check(ops, model).verdict == "linearizable"


def test_edn_reader() -> None:
    assert parse_edn('{:a 1, :b "x \\"y\\"\\n", :c nil, :d [1 -2 3.5], :e true}') == {
        Keyword("a"): 1, Keyword("b"): 'x "y"\n', Keyword("c"): None, Keyword("d"): [1, -2, 3.5],
        Keyword("e"): True}  # fmt: skip
    assert parse_edn("#{1 2}") == frozenset({1, 2})
    for bad in ("{:a 1", "{:a}", "]", '"open', ""):
        with pytest.raises(HistoryFormatError):
            parse_edn(bad)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HistoryFormatError, match="not a history in a known format"):
        detect_format("hello\n")
    with pytest.raises(HistoryFormatError, match="line 2"):
        parse_jepsen_register("INFO  jepsen.util - 0\t:invoke\t:write\t1\nnonsense\n")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"f": "get", "call_ns": 1, "type": "weird"}\n')
    with pytest.raises(HistoryFormatError, match="line 1: unknown type 'weird'"):
        load(path)
