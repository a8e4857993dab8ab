"""The query model shared by `cliprec recommend` and `cliprec serve`: checked once, when it is made."""

from __future__ import annotations

import pytest

from cliprec.errors import CliprecError
from cliprec.query import Query, QueryError


@pytest.mark.parametrize(
    ("fields", "api", "cli"),
    [
        ({}, "no query: give text, image and/or product", "no query: give --text, --image and/or --product"),
        ({"text": "   "}, "text is empty", "--text is empty"),
        ({"image": ""}, "image is empty", "--image is empty"),
        ({"product": "P1", "text": "x"}, "product (more like this) cannot be combined with text or image",
         "--product (more like this) cannot be combined with --text or --image"),
        ({"product": "P1", "image": "a.jpg"}, "cannot be combined", "cannot be combined"),
        ({"text": "x", "k": 0}, "k must be >= 1, not 0", "--k must be >= 1, not 0"),
        ({"text": "x", "k": True}, "k must be >= 1, not True", "--k must be >= 1"),
        ({"text": "x", "weight": 1.5}, "weight must be in [0, 1], not 1.5", "--weight must be in [0, 1]"),
        ({"text": "x", "weight": float("nan")}, "weight must be in [0, 1], not nan", "--weight"),
    ],
)  # fmt: skip
def test_a_query_that_cannot_be_asked_says_why_in_the_askers_words(fields, api, cli):
    with pytest.raises(QueryError) as e:
        Query(**fields)
    assert isinstance(e.value, CliprecError)  # the CLI's one-line user error, exit 2
    assert api in str(e.value) and cli in e.value.as_options()


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"text": "a red shirt"}, "text"),
        ({"image": "q.jpg"}, "image"),
        ({"text": "a red shirt", "image": "q.jpg", "weight": 0.0}, "text+image"),
        ({"product": "P1", "k": 3}, "product"),
    ],
)
def test_a_valid_query_has_its_kind(fields, kind):
    assert Query(**fields).kind == kind
