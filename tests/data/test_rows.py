"""Table rows: line numbers of JSON lines, JSON arrays and CSV (multi-line fields), malformed
rows returned (not raised), bytes that are not UTF-8 flagged on their row only."""

from jaxfit.data.rows import Row, read_rows


def test_json_lines_rows_and_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{bad\n[1]\n{"t": "x\xffy"}\n')
    rows = list(read_rows(p, "json"))
    assert [r.line for r in rows] == [1, 3, 4, 5]
    assert rows[0] == Row(1, {"a": 1})  # byte-order mark dropped
    assert rows[1].value is None and rows[1].error.startswith("not JSON")
    assert rows[2].error == "not a JSON object: [1]"
    assert rows[3] == Row(5, {"t": "x\ufffdy"}, "", True)


def test_json_array_lines_and_syntax_error(tmp_path):
    p = tmp_path / "b.json"
    p.write_text('[\n {"a": 1},\n {"b":\n   2},\n 3,\n {"c": }\n, {"d": 4}]')
    rows = list(read_rows(p, "json"))
    assert [(r.line, r.value) for r in rows[:2]] == [(2, {"a": 1}), (3, {"b": 2})]
    assert rows[2] == Row(5, None, "not a JSON object: 3")
    assert rows[3].line == 6 and "rest of the file is not read" in rows[3].error
    assert len(rows) == 4
    (tmp_path / "e.json").write_text(" [ ] ")
    assert list(read_rows(tmp_path / "e.json", "json")) == []


def test_csv_rows_multiline_fields_and_field_counts(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(
        b'id,body\n1,"first, with comma"\n2,\n3,"multi\nline"\n4,x,y\n5,"bad \xff"\n\n6,z\n'
    )
    rows = list(read_rows(p, "csv"))
    assert [(r.line, r.value) for r in rows[:3]] == [
        (2, {"id": "1", "body": "first, with comma"}),
        (3, {"id": "2", "body": ""}),
        (4, {"id": "3", "body": "multi\nline"}),
    ]
    assert rows[3] == Row(6, None, "3 fields where the header has 2")
    assert rows[4] == Row(7, {"id": "5", "body": "bad \ufffd"}, "", True)
    assert rows[5] == Row(9, {"id": "6", "body": "z"})  # the blank line 8 is no row
