"""The docs stand alone: every relative link of the user-facing Markdown resolves inside the
repository, the definitions and the dataset format are linked from README, config/README and the
module docstrings that rely on them, and no committed file points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "config/README.md", "docs/DEFINITIONS.md", "docs/DATA_SOURCES.md",
        "docs/ARCHITECTURE.md", "docs/HPC.md"]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_inside_the_repository(doc):
    path = REPO / doc
    links = [m for m in LINK.findall(path.read_text()) if "://" not in m]
    for target in links:
        full = (path.parent / target).resolve()
        assert full.exists(), f"{doc}: link {target} does not exist"
        assert full == REPO or REPO in full.parents, f"{doc}: link {target} leaves the repository"


@pytest.mark.parametrize("doc, targets", [
    ("README.md", ["docs/DEFINITIONS.md", "docs/DATA_SOURCES.md"]),
    ("config/README.md", ["../docs/DEFINITIONS.md", "../docs/DATA_SOURCES.md"]),
])
def test_definitions_and_format_are_linked(doc, targets):
    links = LINK.findall((REPO / doc).read_text())
    for t in targets:
        assert t in links, f"{doc} does not link {t}"


def test_no_committed_file_names_a_path_outside_the_repository():
    outside = "/".join(["..", "shared"]), "/".join(["", "work", "shared"])
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    offenders = []
    for f in files:
        try:
            text = (REPO / f).read_text(errors="replace")
        except (IsADirectoryError, FileNotFoundError):
            continue
        offenders += [f for o in outside if o in text]
    assert offenders == []


def test_docstrings_point_at_the_projects_documents():
    broden = (REPO / "cnnvis_pipeline/data/broden.py").read_text()
    assert "docs/DATA_SOURCES.md" in broden.split('"""')[1]
    exact = (REPO / "tests/test_dissection_exact.py").read_text()
    assert "docs/DEFINITIONS.md" in exact.split('"""')[1]


def test_the_captions_of_snakemakes_report_name_existing_config_keys():
    """Every ``section.key`` a caption (workflow/report/*.rst) names is a key of the schema
    (file names such as ``sweep.parquet`` aside)."""
    import yaml

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    named = {}
    for rst in sorted((REPO / "workflow" / "report").glob("*.rst")):
        for key in re.findall(r"``([a-z_]+(?:\.[a-z_]+)+)``", rst.read_text()):
            if key.rsplit(".", 1)[1] not in {"parquet", "png", "html", "json", "csv", "pt"}:
                named.setdefault(key, rst.name)
    assert "views.units" in named and named["views.units"] == "model_report.rst"
    for key, where in named.items():
        node = schema
        for part in key.split("."):
            assert part in node.get("properties", {}), f"{where}: ``{key}`` is not a config key"
            node = node["properties"][part]
