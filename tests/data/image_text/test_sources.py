"""Sources: COCO / CSV / JSONL / HF datasets into ImageCaptions, with counted skips."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from jaxfit.data.image_text.sources import (
    ImageCaptions,
    SkipCounter,
    default_data_config,
    holdout,
    layout_fields,
    load_source,
)
from jaxfit.errors import DataError


def _cfg(**kw):
    cfg = default_data_config()
    cfg.update(kw)
    return cfg


def _png(path: Path, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)
    return path


@pytest.mark.shared_data
def test_coco_mini_counts_and_unlisted_images_ignored(shared):
    root = shared("coco_mini")
    cfg = _cfg(root=str(root))
    train, train_skips = load_source(cfg, "train")
    val, val_skips = load_source(cfg, "val")
    assert (len(train), sum(len(r.captions) for r in train)) == (80, 400)
    assert (len(val), sum(len(r.captions) for r in val)) == (79, 395)
    assert train_skips.total == 0 and val_skips.total == 0
    # val2017/ holds 159 images; only the 79 the JSON lists are records.
    assert len(os.listdir(root / "val2017")) == 159
    assert all(Path(r.image).parent == root / "val2017" and Path(r.image).is_file() for r in val)
    with open(root / "annotations" / "captions_val2017.json") as f:
        listed = {str(im["id"]) for im in json.load(f)["images"]}
    assert {r.image_id for r in val} == listed
    assert all(isinstance(c, str) and c == c.strip() and c for r in train for c in r.captions)


@pytest.mark.shared_data
def test_flickr8k_csv_groups_five_captions_per_image(shared):
    root = shared("flickr8k_1k_small")
    cfg = _cfg(
        format="csv",
        root=str(root),
        captions_file="captions.txt",
        image_dir="images",
        holdout_fraction=0.0,  # one table and no holdout: both splits are all of it
    )
    records, skips = load_source(cfg, "train")
    assert skips.total == 0
    assert len(records) == 1000
    assert all(len(r.captions) == 5 for r in records)
    by_id = {r.image_id: r for r in records}
    # Quoted CSV fields with commas stay whole.
    assert (
        "A dog shakes its head near the shore , a red ball next to it ."
        in by_id["1012212859_01547e3f17.jpg"].captions
    )


@pytest.mark.shared_data
def test_holdout_fraction_splits_one_source_disjointly(shared):
    root = shared("flickr8k_1k_small")
    cfg = _cfg(
        format="csv",
        root=str(root),
        captions_file="captions.txt",
        image_dir="images",
        holdout_fraction=0.2,
        val_split="does-not-exist",  # unused with a holdout
    )
    train, _ = load_source(cfg, "train")
    val, _ = load_source(cfg, "val")
    ids_t, ids_v = {r.image_id for r in train}, {r.image_id for r in val}
    assert not ids_t & ids_v and len(ids_t | ids_v) == 1000
    assert 140 < len(ids_v) < 260
    assert [r.image_id for r in load_source(cfg, "val")[0]] == [r.image_id for r in val]


def _write_coco(root: Path, images, annotations, split="train2017"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"captions_{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)


def test_coco_bad_entries_are_dropped_counted_and_logged(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "train2017" / name)
    images = [
        {"id": 1, "file_name": "a.png"},
        {"id": 2, "file_name": "b.png"},  # only empty captions -> no_caption
        {"id": 3, "file_name": "gone.png"},  # missing file
        {"id": 4, "file_name": "c.png"},  # no annotations at all -> no_caption
    ]
    anns = [
        {"id": 10, "image_id": 1, "caption": "  a red square. "},
        {"id": 11, "image_id": 1, "caption": ""},
        {"id": 12, "image_id": 1, "caption": "another caption"},
        {"id": 13, "image_id": 2, "caption": "   "},
        {"id": 14, "image_id": 2, "caption": None},
        {"id": 15, "image_id": 3, "caption": "of a missing file"},
        {"id": 16, "image_id": 99, "caption": "of an unknown image"},
    ]
    _write_coco(tmp_path, images, anns)
    with caplog.at_level(logging.WARNING, logger="jaxfit.data"):
        records, skips = load_source(_cfg(root=str(tmp_path)), "train")
    assert records == [
        ImageCaptions(
            "1", str(tmp_path / "train2017" / "a.png"), ["a red square.", "another caption"]
        )
    ]
    assert skips.as_dict() == {
        "empty_caption": 3,
        "unknown_image_id": 1,
        "missing_image": 1,
        "no_caption": 2,
    }
    assert skips.metrics()["data/skipped_missing_image"] == 1
    assert "gone.png" in caplog.text and "missing_image" in caplog.text


def test_missing_root_annotation_file_and_image_dir_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_source(_cfg(root=str(missing)), "train")
    with pytest.raises(FileNotFoundError, match="data.root is empty"):
        load_source(_cfg(root=""), "train")
    (tmp_path / "train2017").mkdir()
    ann = tmp_path / "annotations" / "captions_train2017.json"
    with pytest.raises(FileNotFoundError, match=str(ann)):
        load_source(_cfg(root=str(tmp_path)), "train")
    _write_coco(tmp_path, [], [], split="val2017")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val2017")):
        load_source(_cfg(root=str(tmp_path)), "val")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "captions.csv")):
        load_source(_cfg(format="csv", root=str(tmp_path), captions_file="captions.csv"), "val")


def test_bad_format_split_and_column_raise(tmp_path):
    with pytest.raises(ValueError, match="format"):
        load_source(_cfg(format="tfds", root=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="split"):
        load_source(_cfg(root=str(tmp_path)), "test")
    _png(tmp_path / "images" / "a.png")
    (tmp_path / "c.csv").write_text("file,text\na.png,hello\n")
    cfg = _cfg(format="csv", root=str(tmp_path), captions_file="c.csv", image_dir="images")
    with pytest.raises(ValueError, match="caption"):
        load_source(cfg, "train")


def test_jsonl_table_with_caption_lists(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    rows = [
        {"img": "a.png", "text": ["first", " second ", ""]},
        {"img": "b.png", "text": "only one"},
        {"img": "a.png", "text": "third"},
        {"img": "missing.png", "text": "x"},
    ]
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n{not json\n[1, 2]\n"
    )
    cfg = _cfg(
        format="csv",
        root=str(tmp_path),
        captions_file="{split}.jsonl",
        image_dir="imgs",
        image_column="img",
        caption_column="text",
        train_split="train",
    )
    records, skips = load_source(cfg, "train")
    assert [(r.image_id, r.captions) for r in records] == [
        ("a.png", ["first", "second", "third"]),
        ("b.png", ["only one"]),
    ]
    assert skips.as_dict() == {"empty_caption": 1, "missing_image": 1, "bad_row": 2}
    # data.format="jsonl" reads JSON lines whatever the file is called (README: csv|jsonl)
    (tmp_path / "train.json").write_text((tmp_path / "train.jsonl").read_text())
    cfg.format, cfg.captions_file = "jsonl", "{split}.json"
    again, skips_again = load_source(cfg, "train")
    assert again == records and skips_again.as_dict() == skips.as_dict()


def test_hf_imagefolder_string_and_list_caption_columns(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "folder"
    for i in range(3):
        _png(folder / f"img{i}.png", (i * 80, 0, 0))
    rows = [
        {"file_name": "img0.png", "caption": ["a dark square", "a black box"]},
        {"file_name": "img1.png", "caption": ["a red square", ""]},
        {"file_name": "img2.png", "caption": []},
        {"file_name": "gone.png", "caption": ["never seen"]},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(
        format="hf",
        hf_name="imagefolder",
        root=str(folder),
        hf_cache_dir=str(tmp_path / "cache"),
        train_split="train",
    )
    records, skips = load_source(cfg, "train")
    assert [(Path(r.image).name, r.captions) for r in records] == [
        ("img0.png", ["a dark square", "a black box"]),
        ("img1.png", ["a red square"]),
    ]
    assert skips.as_dict() == {"empty_caption": 1, "no_caption": 1, "missing_image": 1}

    # One row per caption (string column), rows of the same image grouped.
    folder2 = tmp_path / "folder2"
    _png(folder2 / "x.png")
    _png(folder2 / "y.png")
    rows = [
        {"file_name": "x.png", "text": "one"},
        {"file_name": "y.png", "text": "two"},
    ]
    (folder2 / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg.update(root=str(folder2), caption_column="text")
    records, skips = load_source(cfg, "train")
    assert [r.captions for r in records] == [["one"], ["two"]] and skips.total == 0


def test_hf_embedded_image_bytes_grouped_by_content(tmp_path):
    datasets = pytest.importorskip("datasets")
    import io

    def png_bytes(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return buf.getvalue()

    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": red, "path": None}, {"bytes": blue, "path": None}]
            + [{"bytes": red, "path": None}],
            "caption": ["red", "blue", "also red"],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string")}
        ),
    )
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    cfg = _cfg(
        format="hf",
        hf_name="parquet",
        root=str(tmp_path / "pq"),
        hf_cache_dir=str(tmp_path / "cache"),
        train_split="train",
    )
    records, skips = load_source(cfg, "train")
    assert skips.total == 0
    assert [(r.image, r.captions) for r in records] == [
        (red, ["red", "also red"]),
        (blue, ["blue"]),
    ]


@pytest.mark.shared_data
def test_max_images_and_default_config_fields(shared):
    cfg = default_data_config()
    for field in (
        "format root captions_file image_dir image_column caption_column hf_name hf_cache_dir "
        "train_split val_split holdout_fraction max_images num_threads augment crop_scale_min "
        "hflip tokenizer vocab_size context_length"
    ).split():
        assert field in cfg, field
    root = shared("coco_mini")
    records, _ = load_source(_cfg(root=str(root), max_images=7), "train")
    assert len(records) == 7


def test_skip_counter_dedupes_keys_and_is_thread_safe():
    import threading

    c = SkipCounter()
    assert c.add("undecodable_image", key="a") and not c.add("undecodable_image", key="a")

    def work():
        for _ in range(500):
            c.add("x")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.as_dict() == {"undecodable_image": 1, "x": 2000}


# --- a folder with a captions table: the defaults of data.format=csv / jsonl ---------------


def _flickr_as(tmp_path: Path, shared, table: str, images: str = "images") -> Path:
    """The Flickr8k sample's images (linked) with its captions written as ``table``:
    ``captions.txt`` / ``captions.csv`` as they are, ``captions.jsonl`` one object per
    image with its captions as a list."""
    src = shared("flickr8k_1k_small")
    root = tmp_path / "photos"
    root.mkdir()
    (root / images).symlink_to(src / "images")
    text = (src / "captions.txt").read_text(encoding="utf-8")
    if table.endswith(".jsonl"):
        grouped: dict[str, list[str]] = {}
        for r in load_source(_cfg(format="csv", root=str(src), holdout_fraction=0.0), "train")[0]:
            grouped[r.image_id] = r.captions
        text = "".join(json.dumps({"image": k, "caption": v}) + "\n" for k, v in grouped.items())
    (root / table).write_text(text, encoding="utf-8")
    return root


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "fmt, table, images",
    [
        ("csv", "captions.txt", "images"),
        ("csv", "captions.csv", "Images"),
        ("jsonl", "captions.jsonl", "images"),
    ],
)
def test_a_captions_folder_needs_only_its_format(tmp_path, shared, fmt, table, images):
    """format + root alone: the table and image folder found by name, 5% held out by a
    stable hash of the image name, the same records as the fields spelled out."""
    root = _flickr_as(tmp_path, shared, table, images)
    cfg = _cfg(format=fmt, root=str(root))
    assert layout_fields(cfg) == {"captions_file": table, "image_dir": images}
    train, skips = load_source(cfg, "train")
    val, _ = load_source(cfg, "val")
    assert skips.total == 0
    ids_t, ids_v = {r.image_id for r in train}, {r.image_id for r in val}
    assert not ids_t & ids_v and len(ids_t | ids_v) == 1000
    assert len(val) == 44  # md5 of the file names below 0.05 * 2**64: 4.4% here
    assert all(len(r.captions) == 5 for r in train + val)
    spelled = _cfg(
        format=fmt, root=str(root), captions_file=table, image_dir=images, holdout_fraction=0.05
    )
    assert load_source(spelled, "val")[0] == val


def test_holdout_applies_only_when_both_splits_read_one_source():
    assert holdout(_cfg(format="coco")) == 0.0  # captions_{split}.json: a val file of its own
    assert holdout(_cfg(format="coco", val_split="train2017")) == 0.05
    assert holdout(_cfg(format="csv", captions_file="c_{split}.csv")) == 0.0
    assert holdout(_cfg(format="csv", captions_file="c.csv", holdout_fraction=0.2)) == 0.2
    assert holdout(_cfg(format="hf", train_split="train", val_split="test")) == 0.0
    assert holdout(_cfg(format="hf", train_split="train", val_split="train")) == 0.05


def test_a_folder_without_the_default_table_names_both_candidates(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_source(_cfg(format="csv", root=str(tmp_path)), "train")
    msg = str(e.value)
    assert str(tmp_path / "captions.csv") in msg
    assert "'captions.csv' or 'captions.txt' and 'images' or 'Images'" in msg


@pytest.mark.shared_data
def test_a_coco_json_read_as_csv_names_the_file_and_the_columns_found(shared):
    root = shared("coco_mini")
    cfg = _cfg(
        format="csv",
        root=str(root),
        captions_file="annotations/captions_train2017.json",
        image_dir="train2017",
    )
    with pytest.raises(DataError) as e:
        load_source(cfg, "train")
    msg = str(e.value)
    assert str(root / "annotations" / "captions_train2017.json") in msg
    assert 'columns found: [\'{"info": {"description": "COCO 2017 D...\'' in msg
    assert "data.format=coco" in msg
