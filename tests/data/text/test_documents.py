"""Text sources: every format on files made here, bad-input counts, splits, real corpora."""

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxfit.data.text import InstructionExample, default_text_config, has_validation, load_documents

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data {p} not available")
    return p


def cfg(**kw):
    c = default_text_config()
    for k, v in kw.items():
        c[k] = v
    return c


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_default_config_has_every_field():
    c = default_text_config()
    for k in (
        "format path val_path text_field instruction prompt_field completion_field "
        "prompt_template split_by_blank_lines doc_separator decode_errors val_fraction "
        "hf_name hf_config hf_split hf_val_split add_bos cache_dir"
    ).split():
        assert k in c, k
    for k in ("name", "vocab_size", "min_frequency", "train_max_chars", "eos_token", "bos_token"):
        assert k in c.tokenizer, k


def test_txt_whole_file_blank_lines_and_separator(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\n\nPara one\nline two\n\n \n\nPara two\r\n\r\nPara three\n")
    (tmp_path / "c.txt").write_text("  \n\n")
    docs, stats = load_documents(cfg(path=str(tmp_path)), "train")
    a = "\n\nPara one\nline two\n\n \n\nPara two\n\nPara three\n"  # CRLF -> LF, else verbatim
    assert docs == [a, "Second file.\n"]  # sorted
    assert (stats.documents, stats.empty) == (2, 1)

    docs, stats = load_documents(cfg(path=str(tmp_path), split_by_blank_lines=True), "train")
    assert docs == ["Para one\nline two", "Para two", "Para three", "Second file."]
    assert stats.empty == 1  # c.txt

    sep = tmp_path / "sep.txt"
    sep.write_text("<|endoftext|>one story\n<|endoftext|>\ntwo\n<|endoftext|>  <|endoftext|>")
    docs, stats = load_documents(cfg(path=str(sep), doc_separator="<|endoftext|>"), "train")
    assert docs == ["one story", "two"]


def test_txt_undecodable_bytes_replace_or_skip(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\xef\xbb\xbfgood one\n\nbad \xff\xfe here\n\nalso good")
    docs, stats = load_documents(cfg(path=str(p), split_by_blank_lines=True), "train")
    assert docs == ["good one", "bad \ufffd\ufffd here", "also good"]  # BOM removed
    assert (stats.decode_replaced, stats.decode_skipped, stats.skipped) == (1, 0, 0)
    docs, stats = load_documents(
        cfg(path=str(p), split_by_blank_lines=True, decode_errors="skip"), "train"
    )
    assert docs == ["good one", "also good"]
    assert (stats.decode_replaced, stats.decode_skipped) == (0, 1)


def test_jsonl_counts_missing_null_empty_nonstring(tmp_path, caplog):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "alpha"},
            {"other": "no text"},
            {"text": None},
            {"text": "   "},
            {"text": 5},
            {"text": "omega", "url": "x"},
        ],
    )
    with caplog.at_level(logging.WARNING):
        docs, stats = load_documents(cfg(path=str(p)), "train")
    assert docs == ["alpha", "omega"]
    assert (stats.documents, stats.missing_field, stats.empty, stats.not_string) == (2, 2, 1, 1)
    assert stats.metrics()["data/skipped_missing_field"] == 2
    assert "2 missing field" in caplog.text


def test_jsonl_undecodable_bytes(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "clean \ufffd kept as is"}])
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "bro\xffken"}\n')
    docs, stats = load_documents(cfg(path=f"{good},{bad}"), "train")
    assert docs == ["clean \ufffd kept as is", "fine", "bro\ufffdken"]
    assert stats.decode_replaced == 1  # only the record from the undecodable file
    docs, stats = load_documents(cfg(path=f"{good},{bad}", decode_errors="skip"), "train")
    assert docs == ["clean \ufffd kept as is", "fine"] and stats.decode_skipped == 1


def test_csv_and_parquet_with_custom_field(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('id,body\n1,"first, with comma"\n2,\n3,"multi\nline"\n', encoding="utf-8")
    docs, stats = load_documents(cfg(path=str(c), text_field="body"), "train")
    assert docs == ["first, with comma", "multi\nline"] and stats.missing_field == 1

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x y", None, "", "z"]}), p)
    docs, stats = load_documents(cfg(path=str(p), text_field="body"), "train")
    assert docs == ["x y", "z"] and (stats.missing_field, stats.empty) == (1, 1)


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"content": ["a b", "c d", ""]}).save_to_disk(str(tmp_path / "one"))
    docs, stats = load_documents(cfg(path=str(tmp_path / "one"), text_field="content"), "train")
    assert docs == ["a b", "c d"] and stats.empty == 1  # format inferred as hf

    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["t1", "t2"]}),
            "dev": Dataset.from_dict({"text": ["v"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    c = cfg(hf_name=str(tmp_path / "dict"), hf_val_split="dev")
    assert has_validation(c)
    assert load_documents(c, "train")[0] == ["t1", "t2"]
    assert load_documents(c, "validation")[0] == ["v"]
    with pytest.raises(ValueError, match="split 'test' not in dataset"):
        load_documents(cfg(hf_name=str(tmp_path / "dict"), hf_split="test"), "train")


def test_instruction_jsonl(tmp_path):
    p = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "2+2=", "completion": " 4"},
            {"prompt": "Hi", "completion": ""},
            {"prompt": "no completion"},
            {"prompt": "", "completion": "free text"},
        ],
    )
    c = cfg(path=str(p), instruction=True, prompt_template="Q: {prompt}\nA:")
    docs, stats = load_documents(c, "train")
    assert docs == [
        InstructionExample("Q: 2+2=\nA:", " 4"),
        InstructionExample("Q: \nA:", "free text"),
    ]
    assert (stats.empty, stats.missing_field) == (1, 1)
    with pytest.raises(ValueError, match="not txt"):
        load_documents(cfg(path=str(tmp_path / "x.txt"), format="txt", instruction=True), "train")


def test_empty_corpus_names_file_and_field(tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", [{"body": "x"}, {"body": "y"}])
    with pytest.raises(ValueError, match=re.escape(str(p)) + r".*field 'text'.*2 missing"):
        load_documents(cfg(path=str(p)), "train")
    t = tmp_path / "empty.txt"
    t.write_text("")
    with pytest.raises(ValueError, match="no usable documents in .*empty.txt"):
        load_documents(cfg(path=str(t)), "train")


def test_validation_by_fraction_and_by_file(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    c = cfg(path=str(p), val_fraction=0.25)  # ceil(2.5) = 3 held out, the last ones
    train, _ = load_documents(c, "train")
    val, vstats = load_documents(c, "validation")
    assert train == [f"doc {i}" for i in range(7)] and val == ["doc 7", "doc 8", "doc 9"]
    assert vstats.documents == 3

    v = write_jsonl(tmp_path / "v.jsonl", [{"text": "held out"}])
    c = cfg(path=str(p), val_path=str(v), val_fraction=0.25)  # val_path wins
    assert len(load_documents(c, "train")[0]) == 10
    assert load_documents(c, "validation")[0] == ["held out"]

    with pytest.raises(ValueError, match="no validation data configured"):
        load_documents(cfg(path=str(p)), "validation")
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        load_documents(cfg(path=str(one), val_fraction=1.5), "train")


def test_fraction_below_one_document_splits_by_tokens(tmp_path, caplog):
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    c = cfg(path=str(one), val_fraction=0.1)
    with caplog.at_level(logging.INFO, logger="jaxfit.data"):
        train, stats = load_documents(c, "train")
    val, vstats = load_documents(c, "validation")
    # both splits hold the whole source; the token-file builder cuts its token stream
    assert train == val == ["a single document"]
    assert stats.split_by_tokens and vstats.split_by_tokens and stats.documents == 1
    assert "splitting by tokens" in caplog.text
    # 10 documents at 0.05 hold out half a document: tokens; at 0.1 one document
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    assert load_documents(cfg(path=str(p), val_fraction=0.05), "train")[1].split_by_tokens
    train, stats = load_documents(cfg(path=str(p), val_fraction=0.1), "train")
    assert len(train) == 9 and not stats.split_by_tokens
    # every document held out (ceil(0.95 * 2) = 2 of 2): tokens too
    two = write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}, {"text": "b"}])
    assert load_documents(cfg(path=str(two), val_fraction=0.95), "train")[1].split_by_tokens


def test_malformed_rows_skipped_and_logged_with_file_and_line(tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        b'{"text": "alpha"}\n'
        b"{not json\n"
        b"\n"  # blank lines are no rows
        b"[1, 2]\n"
        b'{"text": 5}\n'
        b'{"text": "bro\xffken"}\n'
        b'{"text": "omega"'  # unterminated, last line
    )
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        docs, stats = load_documents(cfg(path=str(p)), "train")
    assert docs == ["alpha", "bro\ufffdken"]
    assert (stats.malformed_rows, stats.not_string, stats.decode_replaced) == (3, 1, 1)
    assert stats.skipped == 4 and stats.metrics()["data/skipped_malformed_rows"] == 3
    assert f"skipped line 2 of {p}: not JSON" in caplog.text
    assert f"skipped line 4 of {p}: not a JSON object: [1, 2]" in caplog.text
    assert f"skipped line 5 of {p}: 'text' is int, not a string" in caplog.text
    assert f"skipped line 7 of {p}: not JSON" in caplog.text
    # the file is not valid UTF-8, yet every message names it, never a decoded copy
    assert "jaxfit_text_" not in caplog.text and "/tmp/tmp" not in caplog.text
    assert "3 malformed rows" in caplog.text

    c = tmp_path / "d.csv"
    c.write_text('id,text\n1,"one"\n2,two,extra\n3,"multi\nline"\n4\n5,five\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        docs, stats = load_documents(cfg(path=str(c)), "train")
    assert docs == ["one", "multi\nline", "five"] and stats.malformed_rows == 2
    assert f"skipped line 3 of {c}: 3 fields where the header has 2" in caplog.text
    assert f"skipped line 6 of {c}: 1 fields where the header has 2" in caplog.text


def test_json_array_file(tmp_path, caplog):
    p = tmp_path / "alpaca.json"
    p.write_text('[\n  {"text": "first"},\n  {"text": null},\n  {"text": "third"}\n]\n')
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        docs, stats = load_documents(cfg(path=str(p)), "train")
    assert docs == ["first", "third"] and stats.missing_field == 1
    assert f"skipped line 3 of {p}: no 'text'" in caplog.text


def test_empty_documents_between_separators_are_counted(tmp_path):
    p = tmp_path / "sep.txt"
    p.write_text("<s>one<s> <s>\n<s>two<s><s>")
    docs, stats = load_documents(cfg(path=str(p), doc_separator="<s>"), "train")
    # before the first and after the last separator: no document; between: 3 empty ones
    assert docs == ["one", "two"] and stats.empty == 3


def test_resolution_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_documents(cfg(path=str(tmp_path / "missing.txt")), "train")
    (tmp_path / "a.txt").write_text("x")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}])
    with pytest.raises(ValueError, match="cannot infer one format"):
        load_documents(cfg(path=str(tmp_path / "*")), "train")
    # A glob keeps every match (its author chose it); a directory keeps the format's suffixes.
    docs, _ = load_documents(cfg(path=str(tmp_path / "*"), format="txt"), "train")
    assert docs == ["x", '{"text": "y"}\n']
    docs, _ = load_documents(cfg(path=str(tmp_path), format="txt"), "train")
    assert docs == ["x"]
    with pytest.raises(ValueError, match="format 'xml'"):
        load_documents(cfg(path=str(tmp_path / "a.txt"), format="xml"), "train")


@pytest.mark.shared_data
def test_tinyshakespeare_blocks():
    p = shared("tinyshakespeare/input.txt")
    docs, stats = load_documents(cfg(path=str(p), split_by_blank_lines=True), "train")
    raw = p.read_text(encoding="utf-8")
    assert len(docs) == len(re.split(r"\n\s*\n", raw.strip())) == stats.documents
    assert docs[0].startswith("First Citizen:") and stats.skipped == 0
    assert sum(map(len, docs)) == len(re.sub(r"\n\s*\n", "", raw.strip()))


@pytest.mark.shared_data
def test_c4_jsonl_train_and_validation_files():
    d = shared("c4_en_minimal/derived_jsonl")
    c = cfg(path=str(d / "train.jsonl"), val_path=str(d / "validation.jsonl"))
    train, stats = load_documents(c, "train")
    val, _ = load_documents(c, "validation")
    assert (len(train), len(val), stats.skipped) == (1000, 200, 0)
    first = json.loads((d / "train.jsonl").open(encoding="utf-8").readline())["text"]
    assert train[0] == first
