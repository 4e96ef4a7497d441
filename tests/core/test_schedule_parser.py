"""The schedules' one parser (:func:`lightkv_core.config.parse_values`), property-based: a schedule string is read
as the plain numbers its documented split gives or refused with a message naming the field, and the tuple form
refuses exactly what the string form refuses (issue 21)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core import LightKVConfig
from lightkv_core.config import parse_values

FIELDS = re.compile(r"(merge_layers|merge_windows|merge_ratios)\b")

#: Items near the grammar's edges: numbers, signs, empties, words Python's int()/float() would take.
ITEMS = st.one_of(
    st.integers(0, 40).map(str),
    st.floats(0, 1).map(repr),
    st.sampled_from(
        ["", " ", "-1", "-0", "+1", "nan", "inf", "1e-3", "1E+1", "1e999", "12.0", ".5", "5.", "True", "x", "0x1f"]
    ),
    st.sampled_from(["1_2", "\uff11\uff12", "\u0663", "1 2", "e", "."]),
)
SCHEDULE_TEXT = st.one_of(
    st.builds(lambda items, sep: sep.join(items), st.lists(ITEMS, max_size=4), st.sampled_from([",", "-", " , "])),
    st.text(alphabet="0123456789.,-eE +x", max_size=12),
    st.text(max_size=6),
)
#: Python and NumPy numbers, and what must never pass for one.
NUMBERS = st.one_of(
    st.integers(-3, 40),
    st.integers(0, 40).map(np.int64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1).map(np.float64),
    st.booleans(),
)


def documented_items(text: str) -> list[str]:
    """The items the rule of :func:`parse_values` splits a string into, stripped."""
    return [item.strip() for item in (text.split(",") if "," in text else re.split(r"(?<![eE])-", text.strip()))]


def as_text(values: list) -> str:
    """``values`` written as a comma-separated string (a zero without its sign: ``-0.0`` is no negative number)."""
    return ",".join(str(abs(v)) if v == 0 and not isinstance(v, (bool, np.bool_)) else str(v) for v in values)


@settings(max_examples=500)
@given(SCHEDULE_TEXT, st.sampled_from([int, float]))
def test_parse_values_gives_the_plain_numbers_of_a_string_or_refuses_it_by_name(text: str, kind: type):
    try:
        values = parse_values(text, kind, "--flag")
    except ValueError as error:
        assert str(error).startswith("--flag ") and repr(text) in str(error)
        return
    items = documented_items(text)
    assert all(item[:1] in set("0123456789.") and item.isascii() for item in items)  # no sign, no blank item
    assert values == tuple(map(kind, items)) and all(type(v) is kind for v in values)


@settings(max_examples=300)
@given(SCHEDULE_TEXT, SCHEDULE_TEXT, SCHEDULE_TEXT)
def test_a_schedule_string_is_its_plain_numbers_or_refused_by_name(layers: str, windows: str, ratios: str):
    try:
        config = LightKVConfig(layers, windows, ratios)
    except ValueError as error:
        assert FIELDS.match(str(error)), str(error)
        return
    items = [documented_items(text) for text in (layers, windows, ratios)]
    assert all(item[:1] in set("0123456789.") and item.isascii() for item in sum(items, []))  # no sign, no blank
    assert config == LightKVConfig(
        *(tuple(map(kind, part)) for kind, part in zip((int, int, float), items, strict=True))
    )


@settings(max_examples=300)
@given(*[st.lists(NUMBERS, min_size=1, max_size=3)] * 3)
def test_the_tuple_form_refuses_what_the_string_form_refuses(layers: list, windows: list, ratios: list):
    outcomes = []
    for form in (tuple, as_text):
        try:
            outcomes.append(LightKVConfig(form(layers), form(windows), form(ratios)))
        except ValueError as error:
            assert FIELDS.match(str(error)), str(error)
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    "value, kind, expected",
    [
        ("12-18-24", int, (12, 18, 24)),
        ("12,18,24", int, (12, 18, 24)),
        ("007", int, (7,)),
        ("0.5-1e-3-2E-2", float, (0.5, 0.001, 0.02)),
        ("1e-3,.5,5.", float, (0.001, 0.5, 5.0)),
        ("1e+2", float, (100.0,)),
        ((), int, ()),
        (np.array([0.5, 0.25], dtype=np.float32), float, (0.5, 0.25)),
    ],
)
def test_parse_values_reads(value, kind, expected):
    assert parse_values(value, kind, "x") == expected


@pytest.mark.parametrize(
    "value, kind, message",
    [
        (",", float, "x needs at least one value, got ','"),
        (" - ", int, "x needs at least one value"),
        ("1e-3", int, "'1e-3' is not a non-negative integer"),
        ("1e--3", float, "it holds '--'"),
        ("+1", int, "'\\+1' is not a non-negative integer"),
        (10**400, float, "is too large to be finite"),
        (b"12", int, "b'12' is a bytes, not a number"),
        ({"a": 1}, int, "is a dict, not a number"),
        ([[12]], int, r"\[12\] is a list, not a number"),
    ],
)
def test_parse_values_refuses(value, kind, message):
    with pytest.raises(ValueError, match=message):
        parse_values(value, kind, "x")


def test_parse_values_converts_only_to_int_or_float():
    with pytest.raises(TypeError, match="int or float"):
        parse_values("1", str, "x")
