"""The Broden reader on format edge cases, written by hand (not by the generator)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.decode import decode_label_png
from cnnvis_pipeline.errors import CnnvisError


def _png(path, labels):
    labels = np.asarray(labels, np.int64)
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    rgb[..., 2] = 77  # B is unused
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def make_dataset(root, *, index_rows=None, label_rows=None, categories=("texture", "part", "object")):
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "images" / "b.jpg")
    _png(root / "images" / "a_object.png", [[300, 300, 0, 0]] * 4)  # 300 = R 44 + 256 * G 1
    _png(root / "images" / "a_part_1.png", [[5, 0, 0, 0]] * 4)
    _png(root / "images" / "a_part_2.png", [[6, 6, 0, 0]] * 4)
    (root / "category.csv").write_text(
        "name,first,last,count,frequency\n" + "".join(f"{c},1,1,1,1\n" for c in categories)
    )
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n"
        + "\n".join(label_rows or [
            "5,wheel,part(1),1,1,", "6,door,part(2);object(7),1,1,", "300,car,object(1),1,1,",
            "9,stripes,texture(1),1,1,",
        ]) + "\n"
    )
    header = "image,split,ih,iw,sh,sw," + ",".join(categories)
    rows = index_rows or [
        "a.jpg,train,8,8,4,4,9,a_part_1.png;a_part_2.png,a_object.png",
        "b.jpg,val,8,8,4,4,,,",
    ]
    (root / "index.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root


def test_reads_category_order_layered_planes_and_multi_category_labels(tmp_path):
    ds = load_broden(make_dataset(tmp_path / "d"))
    assert ds.categories == ["texture", "part", "object"]
    assert ds.pixel_categories == ["part", "object"] and ds.image_categories == ["texture"]
    pairs = [(c.label, c.category) for c in ds.concepts]
    # (label, category) pairs in category.csv order; "door" belongs to part and object.
    assert pairs == [(9, "texture"), (5, "part"), (6, "part"), (6, "object"), (300, "object")]
    planes = ds.read_planes(0)
    assert planes["part"].shape == (2, 4, 4)
    assert planes["object"][0, 0, 0] == 300  # R + 256 G decoded without uint8 overflow
    assert ds.records[0].labels == {"texture": [9]}
    assert ds.records[1].pixel == {} and ds.records[1].labels == {}


def test_decode_label_png_uses_r_plus_256_g(tmp_path):
    _png(tmp_path / "x.png", [[0, 255, 256, 1000]])
    assert decode_label_png(tmp_path / "x.png").tolist() == [[0, 255, 256, 1000]]


@pytest.mark.parametrize(
    "rows, message",
    [
        (["a.jpg,train,eight,8,4,4,,,"], "line 2: column 'ih' must be an integer"),
        (["a.jpg,train,8,8,4,4,77,,"], "line 2: column 'texture': label 77 is not in label.csv"),
        (["../a.jpg,train,8,8,4,4,,,"], "resolves outside the dataset's images/"),
        (["/etc/passwd,train,8,8,4,4,,,"], "must be relative to images/"),
        (["a.jpg,train,8,8,4,4,9,a_part_1.png;5,"], "mixes PNG files and label numbers"),
        (["a.jpg,train,8,8,4,4,,,", "b.jpg,val,8,8,4,4,,,,extra"], "line 3: more cells"),
    ],
)
def test_malformed_index_names_file_and_line(tmp_path, rows, message):
    root = make_dataset(tmp_path / "d", index_rows=rows)
    with pytest.raises(CnnvisError) as e:
        load_broden(root)
    assert "index.csv" in str(e.value) and message in str(e.value)


def test_malformed_label_csv(tmp_path):
    root = make_dataset(tmp_path / "d", label_rows=["5,wheel,part(1),1,1,", "5,again,part(1),1,1,"])
    with pytest.raises(CnnvisError, match=r"label.csv: line 3: duplicate label number 5"):
        load_broden(root)
    root = make_dataset(tmp_path / "e", label_rows=["5,wheel,nosuch(1),1,1,"])
    with pytest.raises(CnnvisError, match=r"label.csv: line 2: category 'nosuch'"):
        load_broden(root)


def test_unknown_label_in_png_and_missing_png(tmp_path):
    root = make_dataset(tmp_path / "d")
    _png(root / "images" / "a_object.png", [[301, 0, 0, 0]] * 4)
    ds = load_broden(root)
    with pytest.raises(CnnvisError, match=r"a_object.png: label number\(s\) \[301\]"):
        ds.read_planes(0)
    (root / "images" / "a_part_2.png").unlink()
    with pytest.raises(CnnvisError, match=r"a_part_2.png: segmentation PNG is missing"):
        ds.read_planes(0)


def test_corrupt_image_and_empty_dataset(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "images" / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = load_broden(root)
    with pytest.raises(CnnvisError, match=r"a.jpg: cannot decode image"):
        ds.read_image(0)
    empty = make_dataset(tmp_path / "e")
    (empty / "index.csv").write_text("image,split,ih,iw,sh,sw,texture,part,object\n")
    with pytest.raises(CnnvisError, match="has no images"):
        load_broden(empty)
