"""Interventions with known answers: a classifier whose class-k logit is a planted unit's
activation (ablating the unit takes class k, and only class k, to chance), a linear model whose
FGSM step is sign(w) in closed form, grouped ablations equal to separate ones, and both stages
end to end on a dissected synthnet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from cnnvis_pipeline.cli import main
from cnnvis_pipeline.dissection.pipeline import dissect
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.interventions import ablation as ab
from cnnvis_pipeline.interventions import adversarial as adv
from cnnvis_pipeline.interventions.classdata import ClassData, image_folder
from cnnvis_pipeline.models.edits import edit_layers, run_groups, zero_units
from cnnvis_pipeline.settings import Job, job_spec

K = 4  # classes of the planted classifier


class OneHot(nn.Module):
    """Unit j = 5 where the image's red channel encodes class j (value j / K), else 0."""

    def forward(self, x):
        code = torch.round(x[:, :1] * K)
        return 5.0 * (code == torch.arange(K, dtype=x.dtype).view(1, K, 1, 1)).to(x.dtype)


def planted() -> nn.Module:
    return nn.Sequential(OneHot(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # logit k = unit k


def planted_data(per_class: int = 3) -> ClassData:
    labels = np.repeat(np.arange(K), per_class)
    targets = np.zeros((len(labels), K), bool)
    targets[np.arange(len(labels)), labels] = True

    def read(rows, device):
        x = torch.zeros(len(rows), 3, 4, 4)
        x[:, 0] = torch.as_tensor(labels[rows] / K, dtype=torch.float32).view(-1, 1, 1)
        return x.to(device)

    names = [f"c{k}" for k in range(K)]
    return ClassData(names=names, outputs=np.arange(K), targets=targets,
                     related=[frozenset([n]) for n in names], multi_label=False, read=read,
                     source="planted")


def planted_units() -> pd.DataFrame:
    return pd.DataFrame({"unit": range(K), "concept": [f"c{k}" for k in range(K)],
                         "category": ["object"] * K, "iou": [0.5] * K, "detector": [True] * K})


@pytest.mark.parametrize("metric", ["accuracy", "probability"])
def test_ablating_the_planted_unit_takes_its_class_to_chance_and_no_other(metric):
    data, units = planted_data(), planted_units()
    groups = ab.ablation_groups(units, single=True, top_n=0)
    before, after = ab.ablation_scores(planted(), data, "0", groups, mean=[0] * 3, std=[1] * 3,
                                       device=torch.device("cpu"), metric=metric,
                                       batch_size=5, groups_per_pass=3)
    cols = ab.ablation_columns("m", "0", data, groups, before, after, metric=metric,
                               replicates=50, level=0.9, seed=1)
    t = pd.DataFrame(cols)
    full = 1.0 if metric == "accuracy" else float(torch.softmax(torch.tensor([5.0, 0, 0, 0]), 0)[0])
    assert np.allclose(t["before"], full, rtol=1e-6)
    own = t["unit"] == t["class_index"]
    assert np.allclose(t.loc[own, "after"], 1.0 / K, rtol=1e-6)  # chance
    assert (t.loc[~own, "change"] == 0).all()  # exactly no other class moves
    assert (t.loc[own, "rank"] == 1).all() and set(t.loc[~own, "rank"]) == {2, 3, 4}
    assert t["related"].tolist() == own.tolist()
    # a constant per-image change: the bootstrap interval is that change
    assert np.allclose(t["change_low"], t["change"]) and np.allclose(t["change_high"], t["change"])
    assert (t["images"] == 3).all()


def test_concept_groups_take_the_top_detectors_together():
    units = planted_units()
    units.loc[:, "concept"] = ["a", "a", "a", "b"]
    units.loc[:, "iou"] = [0.2, 0.5, 0.3, 0.9]
    groups = ab.ablation_groups(units, single=False, top_n=2)
    assert [(g.concept, g.units) for g in groups] == [("a", (1, 2)), ("b", (3,))]
    data = planted_data()
    before, after = ab.ablation_scores(planted(), data, "0", groups, mean=[0] * 3, std=[1] * 3,
                                       device=torch.device("cpu"), metric="accuracy")
    _, cls = np.nonzero(data.targets)
    hit = np.isin(cls, [1, 2])
    assert np.allclose(after[0, hit], 1.0 / K) and (after[0, ~hit] == before[~hit]).all()


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()


@pytest.mark.parametrize("at_layer", [False, True])
def test_grouped_ablation_in_one_pass_equals_separate_passes(at_layer):
    model, x = cnn(), torch.rand(3, 3, 8, 8)
    groups = [[0], [2, 4], [], [1, 2, 3]]
    with torch.no_grad():
        together = run_groups(model, x, "1", groups, at_layer=at_layer)
        for g, units in enumerate(groups):
            with edit_layers(model, {"1": zero_units(units)}):
                alone = model(x)
            torch.testing.assert_close(together[g], alone, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(together[0], together[1])  # the ablation changes the output


class Skip(nn.Module):
    """A skip connection around layer `a`: repeating at the layer is wrong for it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return (self.a(x) + x).mean((2, 3))


def test_at_layer_is_used_only_where_it_is_right():
    x = torch.rand(2, 3, 4, 4)
    assert ab.at_layer_ok(cnn(), x, "1", [[], [1]], None, "m")
    assert not ab.at_layer_ok(Skip(), x, "a", [[], [1]], None, "m")
    data = planted_data()
    grouped = ab.ablation_scores(cnn(), data, "1", ab.ablation_groups(planted_units()),
                                 mean=[0] * 3, std=[1] * 3, device=torch.device("cpu"),
                                 metric="logit", groups_per_pass=5)
    alone = ab.ablation_scores(cnn(), data, "1", ab.ablation_groups(planted_units()),
                               mean=[0] * 3, std=[1] * 3, device=torch.device("cpu"),
                               metric="logit", groups_per_pass=1, batch_size=2)
    np.testing.assert_allclose(grouped[1], alone[1], rtol=1e-5, atol=1e-6)


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor, outputs: int):
        super().__init__()
        self.w, self.outputs = w, outputs

    def forward(self, x):
        z = (x.flatten(1) * self.w).sum(1, keepdim=True)
        return z if self.outputs == 1 else torch.cat([torch.zeros_like(z), z], 1)


@pytest.mark.parametrize("multi_label", [False, True])
def test_fgsm_on_a_linear_model_is_x_plus_eps_sign_w(multi_label):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 5, 5)
    w = torch.randn(3 * 5 * 5) * 0.05
    w[w == 0] = 0.01
    model = Linear(w, 1 if multi_label else 2)
    mean, std, eps = [0.5] * 3, [0.25] * 3, 0.03
    with torch.no_grad():
        out = model(adv.normalize(x, mean, std))
    target = (out > 0).float() if multi_label else out.argmax(1)
    predicted_one = (out[:, -1] > 0)
    got = adv.fgsm(adv.model_loss(model, mean, std, target, multi_label), x, eps)
    # the loss grows by pushing w.x away from the predicted side: +sign(w) when the
    # prediction is "0", -sign(w) when it is "1"
    direction = torch.where(predicted_one.view(-1, 1), -1.0, 1.0) * torch.sign(w).view(1, -1)
    expected = (x + eps * direction.view_as(x)).clamp(0, 1)
    assert predicted_one.any() and (~predicted_one).any()
    assert torch.equal(got, expected)
    one_step = adv.pgd(adv.model_loss(model, mean, std, target, multi_label), x, eps, 1, eps)
    assert torch.equal(one_step, expected)  # PGD with one step of eps from x is FGSM
    many = adv.pgd(adv.model_loss(model, mean, std, target, multi_label), x, eps, 7, eps / 3,
                   adv.uniform_start(np.arange(6), x.shape[1:], eps, 0))
    assert float((many - x).abs().max()) <= eps + 1e-7 and many.min() >= 0 and many.max() <= 1


def test_image_folder_and_class_index(tmp_path):
    from PIL import Image

    for folder, colour in (("n1", (255, 0, 0)), ("n0", (0, 0, 255))):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 8), colour).save(tmp_path / "imgs" / folder / f"{i}.png")
    (tmp_path / "idx.json").write_text(json.dumps(
        {"n0": 7, "n1": {"index": 2, "name": "red", "concepts": ["Red", "fire"]}}))
    d = image_folder(tmp_path / "imgs", tmp_path / "idx.json", limit=2, size=(4, 4))
    assert d.names == ["n0", "red"] and d.outputs.tolist() == [7, 2]
    assert d.targets.sum(0).tolist() == [2, 2] and d.related[1] == {"red", "fire"}
    x = d.read(np.array([0, 3]), torch.device("cpu"))
    assert x.shape == (2, 3, 4, 4) and float(x[0, 2].min()) == 1.0 and float(x[1, 0].min()) == 1.0
    (tmp_path / "bad.json").write_text(json.dumps({"n0": 1}))
    with pytest.raises(Exception, match="n1"):
        image_folder(tmp_path / "imgs", tmp_path / "bad.json", limit=2, size=(4, 4))


LAYERS = ["features.relu3", "features.relu4"]


def tiny_spec(**sections) -> dict:
    model = {"name": "tiny", "arch": "synthnet", "kwargs": {"width": 4}, "seed": 1,
             "layers": LAYERS, "mean": [0.5] * 3, "std": [0.25] * 3, "train": {"epochs": 1}}
    config = {"seed": 4, "dissection": {"quantile": 0.02, "statistics": {"enabled": False}},
              "resources": {"batch_size": 16, "device": "cpu"}, **sections}
    return job_spec(model, config, ("dissection", "resources", *sections))


@pytest.fixture(scope="module")
def dissected(prepared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("interventions")
    dissect(Job.from_spec(tiny_spec()), prepared_dir, out, progress=False)
    return out


def test_ablation_command_on_a_train_models_own_labels(prepared_dir, dissected, monkeypatch):
    from cnnvis_pipeline.interventions import stages
    from cnnvis_pipeline.models.registry import build_model

    spec = tiny_spec(ablation={"limit": 4, "replicates": 20, "top_n": 2})
    model, _ = build_model("tiny", dict(spec, kwargs={"width": 4, "num_classes": 9}))
    real = stages.build_model
    monkeypatch.setattr(stages, "build_model", lambda name, s: (model, {}))
    layer_dir = dissected / LAYERS[1]
    assert main(["ablate", "--prepared", str(prepared_dir), "--spec", json.dumps(spec),
                 "--layer", LAYERS[1], "--layer-dir", str(layer_dir)]) == 0
    monkeypatch.setattr(stages, "build_model", real)
    t = pq.read_table(layer_dir / "ablation.parquet").to_pandas()
    units = pq.read_table(layer_dir / "units.parquet").to_pandas()
    assert set(t.loc[t["kind"] == "unit", "unit"]) == set(units["unit"])
    assert (t["images"] <= 4).all() and (t["images"] > 0).any()
    assert (t["before"].dropna().between(0, 1)).all()
    assert np.allclose(t["change"], t["after"] - t["before"], equal_nan=True)
    assert (layer_dir / "ablation.png").stat().st_size > 0


def test_attack_with_zero_eps_changes_nothing_and_pgd_moves_units(prepared_dir, dissected):
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.registry import build_model

    job = Job.from_spec(tiny_spec())
    ds = PreparedDataset(prepared_dir)
    layer_dir = dissected / LAYERS[1]
    units = pq.read_table(layer_dir / "units.parquet").to_pandas()
    thresholds = pq.read_table(layer_dir / "thresholds.parquet").to_pandas()["threshold"]
    model, _ = build_model("tiny", job.model)
    attacks = [adv.Attack("fgsm", 0.0, 1, 0.0, False), adv.Attack("pgd", 0.1, 3, 0.05, True)]
    sums = adv.attack_layer(model, ds, LAYERS[1], thresholds.to_numpy(), attacks,
                            indices=np.arange(len(ds)), mean=[0.5] * 3, std=[0.25] * 3,
                            input_size=None, device=torch.device("cpu"), batch_size=16)
    u, c = adv.adversarial_columns("tiny", LAYERS[1], units, ds, sums, attacks, 0.04)
    u = pd.DataFrame(u)
    zero = u[u["attack"] == "fgsm"]
    assert (zero["iou_change"] == 0).all() and (zero["activation_change"] == 0).all()
    assert (zero["flip_rate"] == 0).all() and (zero["detector_attacked"] == zero["detector"]).all()
    # the clean IoU is the dissection's (float32 maps here, float16 stored there)
    np.testing.assert_allclose(zero["iou_clean"], units.sort_values("unit")["iou"], atol=0.01)
    moved = u[u["attack"] == "pgd"]
    assert (moved["activation_change"].abs() > 0).any()
    c = pd.DataFrame(c)
    assert (c.loc[c["attack"] == "fgsm", "detectors_lost"] == 0).all()
    assert c["detectors"].sum() == 2 * units["detector"].sum()


@pytest.mark.slow
def test_workflow_runs_the_interventions_only_when_configured(workflow, tmp_path):
    config = workflow.config("tiny")
    config["models"]["tiny"]["train"] = {"epochs": 1}
    dry = workflow.run(tmp_path / "off", config, "-n", "--quiet", "rules")
    assert dry.returncode == 0
    assert "ablation_layer" not in dry.stdout and "adversarial_layer" not in dry.stdout
    config.update(ablation={"limit": 3, "replicates": 20},
                  adversarial={"images": 8, "steps": 2})
    run = workflow.run(tmp_path / "on", config)
    assert run.returncode == 0, run.stderr[-2000:]
    layer = tmp_path / "on" / "results" / "tiny" / "features.relu3"
    ablation = pq.read_table(layer / "ablation.parquet").to_pandas()
    attacked = pq.read_table(layer / "adversarial.parquet").to_pandas()
    units = pq.read_table(layer / "units.parquet").to_pandas()
    assert set(ablation.loc[ablation["kind"] == "unit", "unit"]) == set(units["unit"])
    assert sorted(set(attacked["attack"])) == ["fgsm", "pgd"]
    assert len(attacked) == 2 * len(units)
    for name in ("ablation.png", "adversarial.png", "adversarial_concepts.parquet"):
        assert (layer / name).stat().st_size > 0


def test_a_class_index_beyond_the_models_outputs_is_refused():
    data = planted_data()
    data.outputs = np.array([0, 1, 2, 9])
    with pytest.raises(CnnvisError, match="class outputs up to 9"):
        ab.ablation_scores(planted(), data, "0", ab.ablation_groups(planted_units()),
                           mean=[0] * 3, std=[1] * 3, device=torch.device("cpu"))


def test_ablation_tables_are_deterministic_and_do_not_depend_on_the_passes(prepared_dir, dissected,
                                                                           tmp_path):
    import shutil

    from cnnvis_pipeline.interventions.stages import run_ablation
    from cnnvis_pipeline.models.registry import build_model

    spec = tiny_spec(ablation={"limit": 4, "replicates": 30, "top_n": 2})
    model, _ = build_model("tiny", dict(spec, kwargs={"width": 4, "num_classes": 9}))
    tables = []
    for k, per_pass in enumerate((32, 32, 1)):
        d = tmp_path / str(k)
        d.mkdir()
        shutil.copy(dissected / LAYERS[0] / "units.parquet", d / "units.parquet")
        s = dict(spec, ablation=dict(spec["ablation"], groups_per_pass=per_pass))
        run_ablation(Job.from_spec(s), prepared_dir, LAYERS[0], d, model=model)
        tables.append(d / "ablation.parquet")
    assert tables[0].read_bytes() == tables[1].read_bytes()
    a, b = (pq.read_table(t).to_pandas() for t in tables[1:])
    np.testing.assert_allclose(a["change"], b["change"], atol=1e-9)
    np.testing.assert_allclose(a["change_low"], b["change_low"], atol=1e-9)
