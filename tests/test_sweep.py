"""nnlab.sweep: one row per combination of the grid, in nested-loop order."""

import pandas as pd
import pytest

from nnlab.sweep import sweep


def test_one_row_per_combination_in_nested_loop_order():
    calls = []

    def fn(bits, method):
        calls.append((bits, method))
        return {"score": bits * 10 + len(method), "label": f"{method}{bits}"}

    table = sweep(fn, bits=[8, 4], method=["ste", "random"], progress=False)
    assert calls == [(8, "ste"), (8, "random"), (4, "ste"), (4, "random")]
    assert list(table.columns) == ["bits", "method", "score", "label"]
    assert table["score"].tolist() == [83, 86, 43, 46]
    assert table["label"].tolist() == ["ste8", "random8", "ste4", "random4"]
    assert list(table.index) == [0, 1, 2, 3]


def test_same_table_as_the_hand_written_loop():
    def fn(x, y):
        return {"sum": x + y, "product": x * y}

    rows = []
    for x in range(3):
        for y in (1.5, -2.0):
            rows.append({"x": x, "y": y, **fn(x, y)})
    pd.testing.assert_frame_equal(sweep(fn, x=range(3), y=(1.5, -2.0), progress=False), pd.DataFrame(rows))


def test_columns_that_appear_later_are_kept():
    table = sweep(lambda k: {"a": k} if k == 0 else {"a": k, "b": 2 * k}, k=[0, 1], progress=False)
    assert list(table.columns) == ["k", "a", "b"] and pd.isna(table.loc[0, "b"]) and table.loc[1, "b"] == 2


@pytest.mark.parametrize("grid, error, match", [
    ({}, ValueError, "at least one grid"),
    ({"bits": []}, ValueError, "'bits' has no values"),
    ({"bits": 8}, TypeError, "'bits' must be a list"),
    ({"method": "ste"}, TypeError, "'method' must be a list"),
])
def test_bad_grid_is_refused_by_name(grid, error, match):
    with pytest.raises(error, match=match):
        sweep(lambda **kw: {"v": 1}, progress=False, **grid)


def test_bad_function_or_result_is_refused():
    with pytest.raises(TypeError, match="fn must be a function"):
        sweep([1, 2], bits=[8])
    with pytest.raises(TypeError, match=r"must return a dict .* got float for \{'bits': 8\}"):
        sweep(lambda bits: 0.5, bits=[8], progress=False)
    with pytest.raises(ValueError, match=r"\['bits'\], which are also grid names"):
        sweep(lambda bits: {"bits": bits}, bits=[8], progress=False)
