"""document_json: one serialisation and limit check for jsonb documents."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2

from shared.api.documents import document_json


def check(document, max_bytes=1000):
    errors = []
    text = document_json(document, "data", errors, max_bytes=max_bytes)
    return text, [v.description for v in errors]


def test_a_struct_becomes_compact_json():
    data = struct_pb2.Struct()
    data.update({"a": 1, "b": ["x", None]})
    text, errors = check(data)
    assert json.loads(text) == {"a": 1, "b": ["x", None]} and errors == []
    assert " " not in text  # compact


def test_nul_anywhere_is_refused():
    for document in ({"a": "x\x00"}, {"k\x00": 1}, {"a": [{"b": "\x00"}]}):
        assert check(document)[1], document


def test_a_backslash_u0000_text_is_not_a_nul():
    assert check({"path": "C:\\u0000dir"})[1] == []


def test_size_is_counted_in_utf8_bytes():
    assert check({"s": "é" * 10}, max_bytes=20)[1]
    assert check({"s": "e" * 10}, max_bytes=20)[1] == []
