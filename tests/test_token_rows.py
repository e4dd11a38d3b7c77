"""TokenRows, the flat buffer texts' ids travel in, against plain lists."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bertstream.server.token_rows import TokenRows

rows_of_ids = st.lists(st.lists(st.integers(0, 30_000), min_size=1, max_size=20), min_size=1,
                       max_size=25)


@settings(max_examples=60, deadline=None)
@given(rows_of_ids)
def test_rows_hold_each_texts_ids(rows):
    tokens = TokenRows.of(rows)
    assert len(tokens) == len(rows) and tokens.total == sum(map(len, rows))
    assert [row.tolist() for row in tokens] == rows
    assert [tokens[i].tolist() for i in range(-len(rows), len(rows))] == rows + rows


def test_arrays_lists_and_lengths_make_the_same_rows():
    rows = [[101, 7, 102], [101, 102], [101, 5, 6, 9, 102]]
    flat = np.array([i for row in rows for i in row], dtype=np.int32)
    for made in (TokenRows.of(rows), TokenRows.of([np.array(row) for row in rows]),
                 TokenRows.of_lengths(flat, [3, 2, 5])):
        assert made.flat.tolist() == flat.tolist() and made.offsets.tolist() == [0, 3, 5, 10]
        assert made.lengths.tolist() == [3, 2, 5]


def test_ids_that_do_not_fit_int32_are_refused():
    with pytest.raises(OverflowError):
        TokenRows.of([np.array([2**31])])
