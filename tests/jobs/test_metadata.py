"""Hostile and awkward metadata files of a bulk job: refused with a reason, not an error."""

from __future__ import annotations

import pytest

from service.errors import ApiError
from service.jobs.metadata import parse_metadata


@pytest.mark.parametrize("data,name,words", [
    (b'{"file": "a.jpg", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "metadata.jsonl",
     "nested too deeply"),
    (b"file,note\na.jpg," + b"x" * 200_000 + b"\n", "metadata.csv", "line 2"),
    (b"file,n\na.jpg,1\n./a.jpg,2\n", "metadata.csv", "repeats 'a.jpg'"),
    (b'{"file": "a.jpg"}\n{"file": "a.jpg", "n": 2}\n', "metadata.jsonl", "repeats 'a.jpg'"),
])
def test_refused_with_a_reason(data: bytes, name: str, words: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_metadata(data, name)
    assert refused.value.code == "invalid_metadata"
    assert words in refused.value.message


def test_a_csv_tags_column_is_a_list_of_words() -> None:
    rows = parse_metadata(b'file,tags,n\na.jpg,"red; summer, sale",3\nb.jpg,,4\n', "metadata.csv")
    assert rows == {"a.jpg": {"tags": ["red", "summer", "sale"], "n": 3}, "b.jpg": {"n": 4}}
