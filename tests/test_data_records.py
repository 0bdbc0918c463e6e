"""The record index (JSON array and JSONL) and LLaVA record parsing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from comp.data.index import JSONSyntaxError, RecordIndex, line_column
from comp.data.records import SkipSample, assistant_texts, parse_record

RECORDS = [
    {"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe é ü 中文."}, {"from": "gpt", "value": "A \"red\" \\ circle."}]},
    {"id": 2, "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"id": "c", "image": ["p.png", "q.png"], "conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "<image> and <image>?"},
        {"from": "gpt", "value": "both"}]},
]


def write_json(path: Path, records, indent=None) -> Path:
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_and_jsonl_give_the_same_records(tmp_path, indent):
    a = RecordIndex(write_json(tmp_path / "d.json", RECORDS, indent))
    b = RecordIndex(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    assert not a.is_jsonl and b.is_jsonl
    assert [a.load(i) for i in range(len(a))] == [b.load(i) for i in range(len(b))] == RECORDS


def test_index_holds_offsets_not_records(tmp_path):
    index = RecordIndex(write_jsonl(tmp_path / "d.jsonl", RECORDS * 100))
    assert len(index) == 300
    assert index.offsets.dtype == np.int64 and index.lengths.dtype == np.int64
    kinds = {type(v) for v in vars(index).values()}
    assert kinds <= {np.ndarray, bool, type(None)} | {type(index.path)}
    assert index.offsets.nbytes + index.lengths.nbytes == 300 * 16


def test_json_array_records_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr("comp.data.index.CHUNK_BYTES", 100)  # records straddle many chunks
    records = [{"id": i, "conversations": [{"from": "gpt", "value": "w" * (i * 7) + "é"}]} for i in range(40)]
    index = RecordIndex(write_json(tmp_path / "d.json", records, indent=1))
    assert [index.load(i) for i in range(len(index))] == records


@pytest.mark.parametrize("chunk_bytes", [5, 4 << 20])
def test_jsonl_blank_lines_bom_and_crlf(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr("comp.data.index.CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in RECORDS]
    path.write_bytes(b"\xef\xbb\xbf" + f"{lines[0]}\r\n\n   \n{lines[1]}\r\n\t\r\n{lines[2]}".encode())
    index = RecordIndex(path)
    assert [index.load(i) for i in range(len(index))] == RECORDS
    assert RecordIndex(write_json(tmp_path / "e.json", [])).offsets.shape == (0,)


def test_json_syntax_error_between_records_has_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": 1, "conversations": []}\n  {"id": 2}\n]')
    with pytest.raises(JSONSyntaxError) as info:
        RecordIndex(path)
    assert (info.value.line, info.value.column) == (3, 3)
    assert f"{path}:3:3" in str(info.value) and "expected ','" in str(info.value)


def test_json_syntax_error_inside_a_record_has_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"id": 1},\n {"id": 2,\n  "conversations": [}]')
    with pytest.raises(JSONSyntaxError) as info:
        RecordIndex(path)
    assert (info.value.line, info.value.column) == (3, 21)


@pytest.mark.parametrize("text, line, col", [
    ('{"id": 1}', 1, 1),  # not an array
    ('[{"id": 1}', 1, 11),  # not closed
    ('[{"id": 1}] x', 1, 13),  # trailing data
    ('[{"id": 1},]', 1, 12),  # trailing comma
])
def test_json_structure_errors(tmp_path, text, line, col):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(JSONSyntaxError) as info:
        RecordIndex(path)
    assert (info.value.line, info.value.column) == (line, col)


def test_jsonl_bad_line_reports_line_and_column_on_load(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1}\n{"id": "é", "x": tru}\n{"id": 3}\n')
    index = RecordIndex(path)
    assert index.load(2) == {"id": 3}
    with pytest.raises(JSONSyntaxError) as info:
        index.load(1)
    assert (info.value.line, info.value.column) == (2, 18)  # at "tru"


def test_line_column_counts_characters(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab\néüx\n")
    assert line_column(path, 0) == (1, 1)
    assert line_column(path, 3 + 4) == (2, 3)  # 'x' after two 2-byte characters


def test_parse_record_formats():
    a = parse_record(RECORDS[0], 0)
    assert a.id == "a" and a.images == ["x.png"] and a.has_image
    assert a.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nDescribe é ü 中文."}]},
        {"role": "assistant", "content": [{"type": "text", "text": 'A "red" \\ circle.'}]}]
    b = parse_record(RECORDS[1], 1)
    assert b.id == "2" and b.images == [] and not b.has_image
    assert [m["role"] for m in b.messages] == ["user", "assistant"]
    c = parse_record(RECORDS[2], 2)
    assert c.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": " and "},
                                        {"type": "image"}, {"type": "text", "text": "?"}]
    assert assistant_texts(c) == ["both"]
    assert parse_record({"conversations": [{"from": "gpt", "value": "x"}]}, 9).id == "9"


def test_images_without_placeholder_go_before_the_first_user_text():
    rec = parse_record({"image": ["a", "b"], "conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "x"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "y"}]}, 0)
    assert rec.messages[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]
    assert rec.messages[3]["content"] == [{"type": "text", "text": "q2"}]


@pytest.mark.parametrize("obj, reason", [
    ({"image": "a", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
     "placeholder_mismatch"),
    ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "placeholder_mismatch"),
    ([1, 2], "malformed_record"),
    ({"id": 1}, "malformed_record"),
    ({"conversations": []}, "malformed_record"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "malformed_record"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "malformed_record"),
    ({"conversations": ["text"]}, "malformed_record"),
    ({"image": 5, "conversations": [{"from": "human", "value": "q"}]}, "malformed_record"),
    ({"image": "a", "conversations": [{"from": "gpt", "value": "x"}]}, "malformed_record"),
    ({"image": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]},
     "malformed_record"),
])
def test_bad_records_have_reasons(obj, reason):
    with pytest.raises(SkipSample) as info:
        parse_record(obj, 0)
    assert info.value.reason == reason and info.value.detail
