"""The config's documentation is generated from the schema, and old keys name their new place."""

from __future__ import annotations

import pytest

from cnnvis_pipeline import config as cc
from cnnvis_pipeline import configdoc
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Job


def test_readme_is_the_schema_rendered():
    assert configdoc.README.read_text() == configdoc.render(), (
        "config/README.md is out of date: run python -m cnnvis_pipeline.configdoc")


def test_every_key_is_documented():
    assert configdoc.undocumented() == []


def test_rendered_table_shows_each_default_of_the_schema():
    text = configdoc.render()
    assert "| `quantile` | `0.005` |" in text
    assert "| `steps` | `512` |" in text  # views.activation_max: the library default
    assert "## `resources`" in text and "## `views`" in text and "## `report`" in text


def _problems(cfg) -> str:
    with pytest.raises(CnnvisError) as e:
        cc.check_schema(cfg)
    return str(e.value)


BASE = {"dataset": {"synth": {"images": 4}}, "models": {"m": {"arch": "synthnet",
                                                              "layers": ["features.relu3"]}}}


@pytest.mark.parametrize("old, new", [
    ({"dissection": {"shards": 3}}, "dissection.shards has moved: use resources.shards"),
    ({"dissection": {"device": "cpu"}}, "dissection.device has moved: use resources.device"),
    ({"reports": {"top_units": 3}}, "reports.top_units has moved: use views.units"),
    ({"reports": {"top_images": 3}}, "reports.top_images has moved: use report.top_images"),
    ({"reports": {"threads": 2}}, "reports.threads has moved: use resources.threads"),
    ({"dissection": {"statistics": {"seed": 1}}},
     "dissection.statistics.seed has moved: use seed"),
    ({"views": {"inversion": {"spread_images": 8}}},
     "views.inversion.spread_images is no longer a setting"),
])
def test_moved_key_names_its_new_place(old, new):
    msg = _problems({**BASE, **old})
    assert new in msg
    assert msg.count("\n") == 0  # one problem, one line


def test_every_moved_key_is_listed_at_once():
    cfg = {"dataset": {"synth": {"images": 4, "seed": 2}},
           "models": {"m": {"arch": "synthnet", "layers": ["x"], "train": {"seed": 1}}},
           "dissection": {"shards": 2, "batch_size": 8}}
    msg = _problems(cfg)
    for key in ("dataset.synth.seed", "models.m.train.seed", "dissection.shards",
                "dissection.batch_size"):
        assert f"config: {key}" in msg
    assert msg.startswith("4 problems:")


def test_job_parses_sections_once_with_schema_defaults():
    job = Job.from_spec({"name": "m", "layers": ["a"], "seed": 7,
                         "dissection": {"quantile": 0.01}, "views": {"units": 3}})
    assert job.dissection.quantile == 0.01
    assert job.dissection.iou_threshold == 0.04  # the schema's default
    assert job.dissection.statistics.seed == 7 and job.views.activation_max.seed == 7
    assert job.views.units == 3 and job.views.activation_max.steps == 512
    assert job.resources.shards == 2 and job.report.top_images == 9
    assert job.compositional is None
    assert job.model == {"name": "m", "layers": ["a"]}


def test_job_refuses_a_bad_section_naming_the_key():
    with pytest.raises(CnnvisError, match=r"config: dissection\.quantile"):
        Job.from_spec({"name": "m", "layers": ["a"], "dissection": {"quantile": 2}})


def test_a_spec_that_is_not_json_is_a_clear_error():
    with pytest.raises(CnnvisError, match=r"--spec: expected a JSON object .*resnet18"):
        Job.from_json("resnet18")


def test_a_user_config_gets_the_library_view_settings_not_the_demos():
    """Only `make demo` adds config/demo.yaml; a --configfile with dataset and models gets the
    schema's view defaults (the Methods section reports what the views used)."""
    import yaml

    root = configdoc.README.parents[1]
    default = yaml.safe_load((root / "config" / "config.yaml").read_text())
    demo = yaml.safe_load((root / "config" / "demo.yaml").read_text())
    user = {"dataset": {"path": "d"}, "models": {"r": {"torchvision": "resnet18",
                                                        "layers": ["layer4"]}}}
    job = Job.from_spec(dict(user["models"]["r"], name="r",
                             views=cc.merge_with_default(user, default).get("views")))
    assert job.views.activation_max.steps == 512 and job.views.activation_max.size == 128
    assert job.views.inversion.steps == 300
    demo_job = Job.from_spec(dict(user["models"]["r"], name="r",
                                  views=cc.merge_with_default(demo, default)["views"]))
    assert demo_job.views.activation_max.steps == demo["views"]["activation_max"]["steps"] < 512
