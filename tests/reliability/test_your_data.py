"""Your own data: the image-folder and text-table readers, the conversions they promise, and one clear
error for each way the data can be unusable (stages/sources.py, stages/prepare.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from stages import prepare, sources
from stages.inputs import decode_image
from stages.params import PrepareParams
from stages.splits import load_split


def params(**changes) -> PrepareParams:
    return dataclasses.replace(PrepareParams(), **{"image_size": 16, **changes})


def image_tree(root, counts: dict[str, int], size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def table(path, rows, header=("text", "label")):
    path.write_text("\n".join([",".join(header)] + [f'"{t}",{y}' for t, y in rows]) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- conversions


def test_grayscale_palette_rgba_16bit_cmyk_and_exif_rotation_become_upright_rgb(tmp_path):
    red = np.zeros((8, 16, 3), np.uint8)
    red[..., 0] = 255
    files = {
        "gray.png": Image.fromarray(np.full((8, 16), 200, np.uint8)),
        "palette.gif": Image.fromarray(red).convert("P"),
        "cmyk.jpg": Image.fromarray(red).convert("CMYK"),
        "deep.png": Image.fromarray(np.full((8, 16), 65535 // 2, np.uint16)),
    }
    rgba = np.zeros((8, 16, 4), np.uint8)  # fully transparent: composited on white
    files["clear.png"] = Image.fromarray(rgba, "RGBA")
    for name, im in files.items():
        im.save(tmp_path / name)
    # A 16x8 (landscape) picture stored with EXIF orientation 6 ("rotate 90 degrees clockwise to view")
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "rotated.jpg", exif=exif, quality=100)

    out = {n: decode_image(tmp_path / n, 8, 10**6) for n in [*files, "rotated.jpg"]}
    assert all(a.shape == (8, 8, 3) and a.dtype == np.uint8 for a in out.values())
    assert abs(int(out["gray.png"].mean()) - 200) <= 1 and np.ptp(out["gray.png"], axis=2).max() == 0
    assert out["palette.gif"][..., 0].min() > 240 and out["palette.gif"][..., 1:].max() < 15
    assert out["cmyk.jpg"][..., 0].mean() > 230 and out["cmyk.jpg"][..., 1:].mean() < 25
    assert 120 <= out["deep.png"].mean() <= 135  # 16-bit mid-grey scaled to 8-bit mid-grey, not clipped to 255
    assert out["clear.png"].min() == 255
    # Upright, the white half is on top: EXIF orientation was applied before the centre crop.
    rot = out["rotated.jpg"].mean(axis=(1, 2))
    assert rot[:3].mean() > 200 and rot[-3:].mean() < 50


def test_image_folder_reads_classes_skipping_hidden_folders_and_files(tmp_path):
    root = image_tree(tmp_path / "data", {"cat": 3, "dog": 2})
    image_tree(root, {".ipynb_checkpoints": 2})
    (root / ".git").mkdir()
    (root / "cat" / ".DS_Store").write_bytes(b"junk")
    src = sources.image_folder(root, params())
    assert src.classes == ["cat", "dog"]
    assert src.pool.x.shape == (5, 16, 16, 3) and list(src.pool.y) == [0, 0, 0, 1, 1]
    assert src.quarantined == [] and src.test is None


def test_a_fixed_test_split_is_used_as_given(tmp_path):
    image_tree(tmp_path / "data" / "train", {"a": 6, "b": 6})
    image_tree(tmp_path / "data" / "test", {"a": 2, "b": 3}, seed=1)
    manifest = prepare.run(tmp_path / "data", tmp_path / "out", params(dataset="image-folder", per_class=4,
                                                                      val_per_class=2))
    assert manifest["counts"]["test"] == {"a": 2, "b": 3}
    assert load_split(tmp_path / "out", "train").x.shape == (8, 16, 16, 3)


# ------------------------------------------------------------------------------ one error per problem


def test_an_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        sources.image_folder(tmp_path / "empty", params())
    path = table(tmp_path / "t.csv", [])
    with pytest.raises(ValueError, match="holds no rows: the dataset is empty"):
        sources.text_table(path, params())


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = image_tree(tmp_path / "data", {"cat": 2})
    (root / "dog").mkdir()
    with pytest.raises(ValueError, match="class folder\\(s\\) dog hold no files"):
        sources.image_folder(root, params())


def test_classes_differing_only_by_case_are_rejected(tmp_path):
    root = image_tree(tmp_path / "data", {"Cat": 2, "cat": 2})
    with pytest.raises(ValueError, match="differ only by case: Cat / cat"):
        sources.image_folder(root, params())


def test_a_class_too_small_for_the_splits_says_how_many_it_needs(tmp_path):
    image_tree(tmp_path / "data", {"cat": 10, "dog": 4})
    with pytest.raises(ValueError, match=r"class 'dog' has 4 examples; .* need 7\. Add 3 more"):
        prepare.run(tmp_path / "data", tmp_path / "out", params(dataset="image-folder", per_class=4, val_per_class=2,
                                                                test_per_class=1))


def test_an_unreadable_image_names_the_file_and_why(tmp_path):
    root = image_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"(?s)1 of 7 examples .*dog/broken.png: UnidentifiedImageError"):
        prepare.run(root, tmp_path / "out", params(dataset="image-folder", per_class=1, val_per_class=1,
                                                   max_quarantined=0.0), quarantine=tmp_path / "q.json")
    record = json.loads((tmp_path / "q.json").read_text())
    assert record["quarantined"] == 1 and record["items"][0]["file"].endswith("dog/broken.png")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_few_bad_images_are_quarantined_with_their_reason_and_the_rest_used(tmp_path):
    root = image_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "cat" / "notes.txt").write_text("not an image")
    prepare.run(root, tmp_path / "out", params(dataset="image-folder", per_class=1, val_per_class=1,
                                               max_quarantined=0.5), quarantine=tmp_path / "q.json")
    items = {i["file"].rsplit("/", 1)[-1]: i["reason"] for i in json.loads((tmp_path / "q.json").read_text())["items"]}
    assert set(items) == {"truncated.png", "notes.txt"}
    assert "not an image file type" in items["notes.txt"]
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # refused, not "repaired" by a global switch


def _bad_crc(good: bytes) -> bytes:
    at = good.index(b"IDAT") + 8  # a byte of the first image chunk's data: its CRC no longer matches
    return good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1 :]


@pytest.mark.parametrize("name, damage", [
    ("zero.png", lambda good: b""),
    ("bad-crc.png", _bad_crc),
    ("text.jpg", lambda good: b"this is a text file with an image extension\n"),
])  # fmt: skip
def test_broken_image_files_are_quarantined_with_a_reason(tmp_path, name, damage):
    root = image_tree(tmp_path / "data", {"cat": 3})
    (root / "cat" / name).write_bytes(damage((root / "cat" / "0.png").read_bytes()))
    src = sources.image_folder(root, params())
    assert len(src.pool.y) == 3 and [q["file"].rsplit("/", 1)[-1] for q in src.quarantined] == [name]
    assert src.quarantined[0]["reason"]  # e.g. "UnidentifiedImageError: cannot identify image file ..."


def test_a_palette_image_with_a_transparent_colour_is_composited_on_white(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 0, 8, 4))  # top half colour 1 (blue), bottom half colour 0 (red)
    im.save(tmp_path / "p.png", transparency=1)  # colour 1 is transparent
    out = decode_image(tmp_path / "p.png", 8, 10**6)
    assert out[:4].min() == 255  # transparent -> white
    assert (out[4:, :, 0] > 240).all() and (out[4:, :, 1:] < 15).all()  # red stays red


def test_a_decompression_bomb_is_quarantined_before_decoding(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="exceeds prepare.max_pixels"):
        decode_image(tmp_path / "big.png", 8, max_pixels=10_000)


def test_a_missing_label_column_lists_the_columns_there_are(tmp_path):
    path = table(tmp_path / "t.csv", [("hello", "a")], header=("text", "topic"))
    with pytest.raises(ValueError, match="has no column 'label' \\(prepare.label_column\\); its columns are: text, topic"):
        sources.text_table(path, params())


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\nfine,a\n".encode() + "caf\u00e9,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match="t.csv, line 3: not valid utf-8"):
        sources.text_table(path, params())
    src = sources.text_table(path, params(encoding="latin-1"))  # the documented way out
    assert list(src.pool.x) == ["fine", "caf\u00e9"]


def test_empty_texts_nul_bytes_and_missing_labels_are_quarantined(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"text": "good", "label": "a"}, {"text": "", "label": "a"}, {"text": "x\x00y", "label": "b"},
            {"text": "no label", "label": None}, {"text": "fine", "label": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = sources.text_table(path, params())
    assert list(src.pool.x) == ["good", "fine"] and src.classes == ["a", "b"]
    reasons = [q["reason"] for q in src.quarantined]
    assert reasons == ["empty text (text)", "the text holds NUL bytes", "no label (label is empty)"]
    assert src.quarantined[0]["file"].endswith("t.jsonl, line 2")


def test_csv_jsonl_and_parquet_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("a cat, sitting", "animal"), ("bread", "food"), ("a dog", "animal")]
    table(tmp_path / "t.csv", rows)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), tmp_path / "t.parquet")
    got = [sources.text_table(tmp_path / f"t.{ext}", params()) for ext in ("csv", "jsonl", "parquet")]
    for src in got:
        assert list(src.pool.x) == [t for t, _ in rows] and list(src.pool.y) == [0, 1, 0]
        assert src.classes == ["animal", "food"]


def test_wordnet_glosses_are_read_by_topic(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text("  1 This software and database is being provided\n"
                    "00015388 05 n 01 animal 0 | a living organism characterized by voluntary movement\n"
                    "07555863 13 n 01 food 0 | any substance that can be metabolized by an animal\n"
                    "00001740 03 n 01 entity 0 | that which is perceived to have its own distinct existence\n")
    src = sources.wordnet(path, params())
    assert list(src.pool.x) == ["a living organism characterized by voluntary movement",
                                "any substance that can be metabolized by an animal"]
    assert [src.classes[y] for y in src.pool.y] == ["animal", "food"]


# ---------------------------------------------------------------------------------------------- leakage


def test_exact_and_near_duplicate_images_across_splits_are_removed_from_train(tmp_path):
    root = image_tree(tmp_path / "data" / "train", {"a": 6, "b": 6}, size=(32, 32))
    image_tree(tmp_path / "data" / "test", {"a": 2, "b": 2}, size=(40, 40), seed=1)
    yy, xx = np.mgrid[:40, :40]  # a photo-like picture (smooth shapes, not noise) in the test split
    test_a = np.stack([(xx * 6) % 256, ((xx - 20) ** 2 + (yy - 14) ** 2 < 120) * 220, yy * 5], -1).astype(np.uint8)
    Image.fromarray(test_a).save(tmp_path / "data/test/a/0.png")
    Image.fromarray(test_a).save(root / "a" / "copy.png")  # the very same picture
    Image.fromarray(test_a).resize((64, 64)).save(root / "b" / "bigger.jpg", quality=90)  # resized, re-encoded
    p = params(dataset="image-folder", per_class=6, val_per_class=1, near_duplicate_bits=8, max_quarantined=0.5)
    with pytest.raises(ValueError, match="appear in two splits"):
        prepare.run(tmp_path / "data", tmp_path / "out", dataclasses.replace(p, leakage="fail"))
    manifest = prepare.run(tmp_path / "data", tmp_path / "out", p, quarantine=tmp_path / "q.json")
    reasons = sorted(q["reason"].split(" duplicate")[0] for q in json.loads((tmp_path / "q.json").read_text())["leakage_removed"])
    assert reasons == ["exact", "near"]
    assert manifest["leakage_removed"] == 2 and sum(manifest["counts"]["train"].values()) == 10


def test_duplicate_texts_across_splits_are_removed_from_train(tmp_path):
    from stages.splits import Split

    splits = {"train": Split(np.array(["A cat!", "a dog", "bread"], dtype=object), np.array([0, 0, 1])),
              "val": Split(np.array(["rye"], dtype=object), np.array([1])),
              "test": Split(np.array(["a   CAT", "bread"], dtype=object), np.array([0, 1]))}
    kept, leaks = prepare.remove_leakage(splits, params())
    assert list(kept["train"].x) == ["a dog"]
    assert [q["reason"] for q in leaks] == ["exact duplicate of test example 1", "near duplicate of test example 0"]
