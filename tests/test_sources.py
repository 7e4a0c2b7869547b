"""Dataset sources besides Broden (data/sources/): ADE20K, COCO panoptic, a mask folder, merged
concept sets; fixtures written in each real format by tests/source_formats.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from source_formats import (
    MASK_CLASSES,
    layout,
    save_png,
    write_ade20k,
    write_broden,
    write_coco_panoptic,
    write_masks,
)
from torch import nn

from cnnvis_pipeline.cli import main
from cnnvis_pipeline.data.prepared import PreparedDataset, prepare_dataset, write_prepared
from cnnvis_pipeline.data.sources import open_source, source_digest
from cnnvis_pipeline.data.sources.prepare import validate_source
from cnnvis_pipeline.dissection.pipeline import dissect
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Job


def planted() -> nn.Module:
    """Unit 0 fires on pure red, unit 1 on pure blue (0 elsewhere), at the input's size."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, -1, 1]])[..., None, None])
        conv.bias.fill_(-0.5)
    return nn.Sequential(conv, nn.ReLU())


def dissect_units(prepared: Path, out: Path) -> pd.DataFrame:
    spec = {"name": "planted", "layers": ["1"], "mean": [0, 0, 0], "std": [1, 1, 1],
            "dissection": {"quantile": 0.2, "iou_threshold": 0.04},
            "resources": {"batch_size": 4, "device": "cpu"}}
    res = dissect(Job.from_spec(spec), prepared, out, model=planted(), progress=False)
    return res["units"]["1"].set_index("unit")


def prepare(dataset: dict, out: Path, **kw) -> PreparedDataset:
    source = open_source(dataset)
    write_prepared(source, out, size=dataset.get("size"), progress=False,
                   digest=source_digest(dataset)["digest"], **kw)
    return PreparedDataset(out)


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    return write_coco_panoptic(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> dict:
    return write_masks(tmp_path_factory.mktemp("masks"))


def test_ade20k_concepts_splits_and_planted_units(ade, tmp_path):
    ds = prepare({"ade20k": str(ade)}, tmp_path / "p")
    assert ds.categories == ["object", "scene"] and ds.category_kind == ["pixel", "image"]
    objects = [c for c in ds.concepts if c["category"] == "object"]
    assert len(objects) == 150 and objects[20] == {"label": 21, "name": "car",
                                                   "category": "object"}
    assert [c["name"] for c in ds.concepts if c["category"] == "scene"] == ["highway", "street"]
    assert len(ds) == 10 and ds.meta["splits"].count("train") == 4
    assert ds.meta["images"][0] == "training/ADE_train_00000001.jpg"
    assert ds.meta["labels"] == "annotations" and ds.meta["source_info"]["kind"] == "ade20k"
    units = dissect_units(tmp_path / "p", tmp_path / "out")
    assert units.loc[0, ["concept", "category", "iou"]].tolist() == ["car", "object", 1.0]
    assert units.loc[1, ["concept", "category", "iou"]].tolist() == ["sky", "object", 1.0]
    val = prepare({"ade20k": str(ade), "split": "val", "limit": 3}, tmp_path / "v")
    # 3 of the 6 validation images, spread evenly over the sorted names
    assert val.meta["images"] == [f"validation/ADE_val_{k:08d}.jpg" for k in (1, 3, 5)]
    assert set(val.meta["splits"]) == {"val"}


def test_coco_panoptic_things_stuff_and_crowd(coco, tmp_path):
    ds = prepare({"coco_panoptic": coco}, tmp_path / "p")
    assert ds.categories == ["thing", "stuff"]
    assert [(c["label"], c["name"], c["category"]) for c in ds.concepts] == [
        (1, "person", "thing"), (3, "car", "thing"), (119, "sky-other-merged", "stuff"),
        (200, "wall-other-merged", "stuff")]
    # image 1's car is a crowd segment: labelled with its category like the others
    thing = ds.planes[1, list(ds.plane_category).index(0)]
    assert (thing == 3).sum() == 128
    units = dissect_units(tmp_path / "p", tmp_path / "out")
    assert units.loc[0, ["concept", "category", "iou"]].tolist() == ["car", "thing", 1.0]
    assert units.loc[1, ["concept", "category", "iou"]].tolist() == [
        "sky-other-merged", "stuff", 1.0]


def test_masks_csv_from_a_spreadsheet_and_planted_unit(masks, tmp_path):
    ds = prepare({"masks": masks}, tmp_path / "p")
    assert [(c["label"], c["name"], c["category"]) for c in ds.concepts] == MASK_CLASSES
    units = dissect_units(tmp_path / "p", tmp_path / "out")
    assert units.loc[0, ["concept", "iou"]].tolist() == ["car", 1.0]
    assert units.loc[1, ["concept", "iou"]].tolist() == ["sky, blue", 1.0]


def test_broden_and_masks_of_the_same_content_give_identical_tables(masks, tmp_path):
    broden = write_broden(tmp_path / "broden")
    a = dissect_units(prepare_dataset(broden, tmp_path / "pb", progress=False), tmp_path / "a")
    b = dissect_units(prepare({"masks": masks}, tmp_path / "pm").path, tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)
    for table in ("iou", "units", "thresholds", "top_images"):
        ta = pd.read_parquet(tmp_path / "a" / "1" / f"{table}.parquet")
        tb = pd.read_parquet(tmp_path / "b" / "1" / f"{table}.parquet")
        pd.testing.assert_frame_equal(ta, tb, obj=table)


def test_merged_concepts_add_colour_and_qualify_colliding_categories(ade, masks, tmp_path):
    extra = tmp_path / "extra"
    for k in range(10):  # the ADE images' second opinion: every car pixel is "vehicle"
        _, cls = layout(k)
        split, stem = ("training", f"ADE_train_{k + 1:08d}") if k < 4 else (
            "validation", f"ADE_val_{k - 3:08d}")
        save_png((cls == 2).astype(np.uint8), extra / split / f"{stem}.png", "L")
    (tmp_path / "vehicle.csv").write_text("1,car,object\n")
    spec = {"concepts": [{"ade20k": str(ade)}, {"colour": {}},
                         {"masks": {"masks": str(extra), "classes": str(tmp_path / "vehicle.csv")}}]}
    ds = prepare(spec, tmp_path / "p")
    assert ds.categories == ["object", "scene", "color", "object-masks"]
    assert len(ds.concepts) == 150 + 2 + 11 + 1
    names = [(c["name"], c["category"]) for c in ds.concepts]
    assert ("car", "object") in names and ("car", "object-masks") in names  # both kept
    units = dissect_units(tmp_path / "p", tmp_path / "out")
    iou = pd.read_parquet(tmp_path / "out" / "1" / "iou.parquet")
    red = iou[(iou.unit == 0) & (iou.concept == "red") & (iou.category == "color")]
    car2 = iou[(iou.unit == 0) & (iou.concept == "car") & (iou.category == "object-masks")]
    assert red.iou.item() == 1.0 and car2.iou.item() == 1.0
    assert units.loc[0, "iou"] == 1.0


def test_size_resizes_images_bilinear_and_labels_nearest(ade, tmp_path):
    ds = prepare({"ade20k": str(ade), "size": 64}, tmp_path / "p")
    assert ds.images.shape[1:3] == (64, 64) and ds.seg_size == (64, 64)
    _, cls = layout(0)
    want = np.array([0, 1, 21, 3])[cls].repeat(2, 0).repeat(2, 1)  # nearest: each pixel 2x2
    np.testing.assert_array_equal(ds.planes[0, 0], want)


def test_broden_size_keeps_the_labels_ratio(synth_dir, tmp_path):
    ds = PreparedDataset(prepare_dataset(synth_dir, tmp_path / "p", image_size=48,
                                         progress=False))
    assert ds.images.shape[1:3] == (48, 48)
    base = PreparedDataset(prepare_dataset(synth_dir, tmp_path / "q", progress=False))
    (ih, iw), (sh, sw) = base.meta["image_size"], base.seg_size
    assert ds.seg_size == (round(48 * sh / ih), round(48 * sw / iw))


def _bad(path: Path, text: str | bytes) -> None:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)


def test_malformed_files_of_each_format_are_named_all_at_once(ade, coco, masks, tmp_path):
    import shutil

    a = tmp_path / "ade"
    shutil.copytree(ade, a)
    _bad(a / "objectInfo150.csv", "Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\nx,0.1,1,1,sky\n")
    bad_png = a / "annotations" / "validation" / "ADE_val_00000002.png"
    save_png(np.full((32, 32), 200, np.uint8), bad_png, "L")
    (a / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    problems, _ = validate_source({"ade20k": str(a)}, workers=2)
    assert f"{a / 'objectInfo150.csv'}: line 3" in problems[0]
    assert any(p.startswith(f"{bad_png}: value(s) [200]") for p in problems)
    assert any("ADE_train_00000003.png: annotation PNG is missing" in p for p in problems)

    c = json.loads(Path(coco["annotations"]).read_text())
    del c["annotations"][2]["segments_info"][0]["category_id"]
    bad_json = tmp_path / "panoptic.json"
    bad_json.write_text(json.dumps(c))
    problems, _ = validate_source({"coco_panoptic": dict(coco, annotations=str(bad_json))})
    png = Path(coco["masks"]) / "000000000003.png"
    assert problems == [  # the JSON's problem, and what it makes of the image's PNG
        f"{bad_json}: annotations[2].segments_info[0]: missing or invalid 'category_id'",
        f"{png}: segment id(s) [71002] are not in the segments_info of its annotation in "
        f"{bad_json}"]
    bad_json.write_text("{not json")
    with pytest.raises(CnnvisError, match=f"^{bad_json}: not a readable JSON"):
        open_source({"coco_panoptic": dict(coco, annotations=str(bad_json))})

    m = tmp_path / "classes.csv"
    m.write_text("index,name\n1,wall\n1,car\n0,none\n2,car\n3,sky\n")
    problems, _ = validate_source({"masks": dict(masks, classes=str(m))})
    assert problems == [f"{m}: line 3: index 1 is also on line 2",
                        f"{m}: line 4: index 0 must be 1..65535 (0 means unlabelled)"]
    md = tmp_path / "m"
    shutil.copytree(masks["masks"], md)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(md / "img_4.png")
    problems, _ = validate_source({"masks": dict(masks, masks=str(md))})
    assert problems == [f"{md / 'img_4.png'}: annotation PNG has mode RGB; it must hold one "
                        "class index per pixel (8-bit grayscale or palette, or 16-bit)"]


def test_validation_stops_at_its_bound(masks, tmp_path):
    import shutil

    md = tmp_path / "m"
    shutil.copytree(masks["masks"], md)
    for k in range(6):
        save_png(np.full((32, 32), 9, np.uint8), md / f"img_{k}.png", "L")
    problems, _ = validate_source({"masks": dict(masks, masks=str(md))}, max_problems=4)
    assert len(problems) == 5 and problems[-1].startswith("(stopped after 4 problems")
    assert problems[0] == f"{md / 'img_0.png'}: value(s) [9] are not in {masks['classes']}"


def test_commands_digest_validate_prepare(ade, tmp_path, capsys):
    spec = json.dumps({"ade20k": str(ade), "split": "val"})
    digest = tmp_path / "d.json"
    assert main(["source-digest", "--spec", spec, "--out", str(digest), "--manifests",
                 str(tmp_path / "man")]) == 0
    other = tmp_path / "d2.json"
    main(["source-digest", "--spec", json.dumps({"ade20k": str(ade)}), "--out", str(other)])
    first = json.loads(digest.read_text())["digest"]
    assert first != json.loads(other.read_text())["digest"]  # options are part of the digest
    assert main(["source-validate", "--spec", spec]) == 0
    assert "ade20k: OK: 6 images (6 val), 152 concepts" in capsys.readouterr().out
    args = ["source-prepare", "--spec", spec, "--digest-file", str(digest), "--data-root",
            str(tmp_path / "root"), "--name", "ade", "--receipt", str(tmp_path / "r.json"),
            "--quiet"]
    assert main(args) == 0 and main(args) == 0  # complete for the same digest: success
    ds = PreparedDataset(tmp_path / "r.json")
    assert len(ds) == 6 and ds.digest == first and ds.meta["source"] == f"ade20k: {ade.resolve()}"


def test_dataset_names_of_sources_are_safe_and_distinct(ade, coco, masks):
    from cnnvis_pipeline.config import dataset_name, dataset_source_dir

    specs = [{"ade20k": str(ade)}, {"coco_panoptic": coco}, {"masks": masks},
             {"concepts": [{"ade20k": str(ade)}, {"colour": {}}]}]
    names = [dataset_name({"dataset": s}) for s in specs]
    assert [n.split("-")[0] for n in names] == ["ade20k", "coco_panoptic", "masks", "concepts"]
    assert names[0].startswith("ade20k-ADEChallengeData2016-") and len(set(names)) == 4
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
               for n in names)
    assert dataset_source_dir({"dataset": specs[0]}) == ""  # read in place


def test_workflow_prepares_an_ade20k_config(ade, workflow, tmp_path, monkeypatch):
    """The data rules of a five-line config: digest, validation, preparation (with options)."""
    config = {"dataset": {"ade20k": str(ade), "size": 16, "split": "train"},
              "models": {"net": {"arch": "synthnet", "layers": ["features.relu3"]}}}
    proc = workflow.run(tmp_path, config, "results/digests/prepared.json",
                        env=workflow.env(workflow.repo))
    assert proc.returncode == 0
    monkeypatch.chdir(tmp_path)  # the receipt names the entry relative to the run's directory
    ds = PreparedDataset("results/digests/prepared.json")
    assert len(ds) == 4 and ds.images.shape[1:3] == (16, 16) and ds.meta["splits"] == ["train"] * 4
    assert ds.digest == json.loads((tmp_path / "results/digests/dataset.json").read_text())["digest"]
    assert (tmp_path / "results/digests/validated.txt").read_text().startswith(
        "ade20k: OK: 4 images (4 train)")


SEGMENTER = '''
import torch
from torch import nn


def build():
    """Channel 0 background, 1 red, 2 blue: a colour 'segmenter' (1x1 convolution)."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[0.0, 0, 0], [1, -1, -1], [-1, -1, 1]])[..., None, None])
        conv.bias.copy_(torch.tensor([0.2, 0.0, 0.0]))
    return conv
'''


def test_segmenter_predictions_are_labels_with_their_provenance(masks, tmp_path, monkeypatch):
    from cnnvis_pipeline.dissection.segment import segment_shard
    from cnnvis_pipeline.models.registry import file_sha256

    (tmp_path / "colour_seg.py").write_text(SEGMENTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import colour_seg

    torch.save(colour_seg.build().state_dict(), tmp_path / "seg.pt")
    (tmp_path / "channels.csv").write_text("channel,name\n1,car\n2,sky\n")
    spec = {"segmenter": {"images": masks["images"], "factory": "colour_seg:build",
                          "checkpoint": str(tmp_path / "seg.pt"),
                          "classes": str(tmp_path / "channels.csv"), "mean": [0, 0, 0],
                          "std": [1, 1, 1]}}
    shards = [segment_shard(spec, tmp_path / f"s{k}", shard=k, shards=2, device="cpu",
                            batch_size=2) for k in range(2)]
    source = open_source(spec, predictions=shards)
    write_prepared(source, tmp_path / "p", size=None, digest=source_digest(spec)["digest"],
                   progress=False)
    ds = PreparedDataset(tmp_path / "p")
    assert ds.meta["labels"] == "predictions"
    assert ds.meta["source_info"]["checkpoint_sha256"] == file_sha256(tmp_path / "seg.pt")
    assert [(c["label"], c["name"]) for c in ds.concepts] == [(2, "car"), (3, "sky")]
    _, cls = layout(3)
    np.testing.assert_array_equal(ds.planes[3, 0], np.where(cls >= 2, cls, 0))  # 0: background
    units = dissect_units(tmp_path / "p", tmp_path / "out")
    assert units.loc[0, ["concept", "iou"]].tolist() == ["car", 1.0]
    before = source_digest(spec)["digest"]
    (tmp_path / "seg.pt").write_bytes((tmp_path / "seg.pt").read_bytes() + b"\0")
    assert source_digest(spec)["digest"] != before  # the checkpoint is part of the content
    with pytest.raises(CnnvisError, match="channels.csv: names channel 5, but the model has 3"):
        (tmp_path / "channels.csv").write_text("5,car\n")
        segment_shard(spec, tmp_path / "bad", device="cpu")


def test_bench_ade20k_and_broden_preparations_give_the_same_arrays(tmp_path):
    from cnnvis_pipeline.bench.sources import run

    out = run(6, 24, 32, 16, 1, 3, tmp_path)
    assert out["same_arrays"] is True and out["images"] == 6
    assert out["ade20k_images_per_s"] > 0 and out["broden_images_per_s"] > 0


def test_workflow_prepares_broden_with_size_and_limit(workflow, tmp_path, monkeypatch):
    config = {"dataset": {"synth": {"images": 30, "size": 32}, "size": 48, "limit": 10},
              "models": {"net": {"arch": "synthnet", "layers": ["features.relu3"]}}}
    assert workflow.run(tmp_path, config, "results/digests/prepared.json",
                        env=workflow.env(workflow.repo)).returncode == 0
    monkeypatch.chdir(tmp_path)
    ds = PreparedDataset("results/digests/prepared.json")
    content = json.loads(Path("results/digests/dataset.json").read_text())["digest"]
    assert len(ds) == 10 and ds.images.shape[1:3] == (48, 48) and ds.seg_size == (24, 24)
    assert ds.digest != content  # the options make another prepared entry than the plain one
    assert Path(ds.path).name.endswith(ds.digest[:16])


def test_workflow_labels_a_folder_with_a_segmenter(masks, workflow, tmp_path, monkeypatch):
    (tmp_path / "colour_seg.py").write_text(SEGMENTER)
    (tmp_path / "channels.csv").write_text("1,car\n2,sky\n")
    config = {"dataset": {"segmenter": {"images": masks["images"], "factory": "colour_seg:build",
                                        "classes": str(tmp_path / "channels.csv"),
                                        "mean": [0, 0, 0], "std": [1, 1, 1]}},
              "models": {"net": {"arch": "synthnet", "layers": ["features.relu3"]}},
              "resources": {"shards": 2, "device": "cpu"}}
    proc = workflow.run(tmp_path / "run", config, "results/digests/prepared.json",
                        env=workflow.env(workflow.repo, tmp_path))
    assert proc.returncode == 0
    monkeypatch.chdir(tmp_path / "run")
    ds = PreparedDataset("results/digests/prepared.json")
    assert ds.meta["labels"] == "predictions" and len(ds) == 6
    _, cls = layout(5)
    np.testing.assert_array_equal(ds.planes[5, 0], np.where(cls >= 2, cls, 0))
    assert not Path("results/segment").exists() or not any(Path("results/segment").iterdir())


def test_masks_split_reads_its_subfolders(tmp_path):
    spec = write_masks(tmp_path / "all", n=4)
    for sub in ("images", "masks"):  # move the first two of each folder into train/
        (tmp_path / "all" / sub / "train").mkdir()
        for k in (0, 1):
            f = next((tmp_path / "all" / sub).glob(f"img_{k}.*"))
            f.rename(f.parent / "train" / f.name)
    ds = prepare({"masks": spec, "split": "train"}, tmp_path / "p")
    assert ds.meta["images"] == ["train/img_0.png", "train/img_1.png"]
    assert ds.meta["splits"] == ["train", "train"]
    _, cls = layout(1)
    np.testing.assert_array_equal(ds.planes[1, 0], cls)
