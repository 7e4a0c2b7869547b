"""PreparedData (data/interface.py) is what the later stages read of a prepared dataset.

- PreparedDataset satisfies it: every member exists with the type, dtype and shape its docstring
  gives (`<type> [<shape>]:`), on a small prepared broden-synth dataset;
- dissection/, interventions/, viz/, models/synthnet.py, models/check.py and bench/ read nothing else: every
  attribute they read of a prepared dataset (a name or attribute `ds`/`dataset`, or a name
  annotated or constructed as a PreparedDataset, such as `prepared`) is a member, and every key
  they read of its `meta` is one of META_KEYS.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cnnvis_pipeline.data.interface import META_KEYS, Batch, PreparedData
from cnnvis_pipeline.data.prepared import PreparedDataset

PKG = Path(__file__).resolve().parents[1] / "cnnvis_pipeline"
READERS = [*sorted((PKG / "dissection").glob("*.py")),
           *sorted((PKG / "interventions").glob("*.py")), *sorted((PKG / "viz").glob("*.py")),
           PKG / "models" / "synthnet.py", PKG / "models" / "check.py",
           *sorted((PKG / "bench").glob("*.py"))]
DATASET_NAMES = {"ds", "dataset"}  # the names a prepared dataset goes by
PREPARED_TYPES = {"PreparedDataset", "PreparedData"}
_DOC = re.compile(r"^(?P<type>[\w]+(?:\[[\w, ]+\])?)(?: \[(?P<shape>[^\]]*)\])?:")


def members() -> dict[str, str]:
    """Member name -> its docstring's first line."""
    out = {}
    for name, value in vars(PreparedData).items():
        if isinstance(value, property) or (callable(value) and (not name.startswith("_")
                                                                or name == "__len__")):
            out[name] = (value.__doc__ or "").strip()
    return out


def spec(name: str) -> tuple[str, list[str] | None]:
    m = _DOC.match(members()[name])
    assert m, f"PreparedData.{name}: the docstring must start with '<type> [<shape>]:'"
    shape = m.group("shape")
    if shape is None:
        return m.group("type"), None
    dims = ast.parse(f"({shape},)", mode="eval").body.elts  # split at the top-level commas
    return m.group("type"), [ast.unparse(d) for d in dims]


def check_shape(name: str, shape: tuple[int, ...], dims: list[str], sizes: dict[str, int],
                deferred: list) -> None:
    """Bind each letter at its first use; compare numbers and bound letters; expressions (such
    as max(P, 1)) are compared once every letter is bound."""
    assert len(shape) == len(dims), f"{name}: shape {shape}, documented [{', '.join(dims)}]"
    for got, dim in zip(shape, dims, strict=True):
        if dim.isdigit():
            assert got == int(dim), f"{name}: shape {shape}, documented [{', '.join(dims)}]"
        elif dim.isidentifier():
            assert sizes.setdefault(dim, got) == got, f"{name}: {dim} = {got}, not {sizes[dim]}"
        else:
            deferred.append((name, dim, got))


@pytest.fixture(scope="module")
def prepared(prepared_dir) -> PreparedDataset:
    return PreparedDataset(prepared_dir)


def test_prepared_dataset_is_prepared_data(prepared):
    assert isinstance(prepared, PreparedData)
    fields = {name: getattr(prepared, name) for name in members() if name != "__len__"}
    fields.pop("digest")
    assert not isinstance(SimpleNamespace(**fields), PreparedData)  # one member missing


def test_every_member_has_its_documented_type_dtype_and_shape(prepared):
    n = len(prepared)
    sizes = {"N": n, "C": len(prepared.categories), "K": len(prepared.concepts)}
    deferred: list = []
    checked = set()
    for name in members():
        kind, dims = spec(name)
        if name in ("__len__", "batch"):
            continue  # checked below
        value = getattr(prepared, name)
        if kind.startswith(("list[", "tuple[")):
            outer, inner = kind.split("[", 1)
            assert isinstance(value, list if outer == "list" else tuple), name
            types = [{"str": str, "int": int, "dict": dict}[t.strip()]
                     for t in inner.rstrip("]").split(",")]
            assert all(isinstance(v, types[min(i, len(types) - 1)])
                       for i, v in enumerate(value)), f"{name}: elements are not {inner}"
            check_shape(name, (len(value),), dims, sizes, deferred)
        elif kind in ("str", "dict"):
            assert isinstance(value, str if kind == "str" else dict), name
        else:
            assert isinstance(value, np.ndarray), f"{name}: {type(value).__name__}"
            assert value.dtype == np.dtype(kind), f"{name}: {value.dtype}, documented {kind}"
            check_shape(name, value.shape, dims, sizes, deferred)
        checked.add(name)
    for name, dim, got in deferred:
        assert got == eval(dim, {"max": max}, dict(sizes)), f"{name}: {dim} != {got}"
    assert checked == set(members()) - {"__len__", "batch"}
    assert spec("__len__")[0] == "int" and isinstance(n, int) and n == 48
    assert prepared.seg_size == (sizes["sh"], sizes["sw"])
    assert sizes["P"] > 0 and sizes["J"] > 1  # the dataset exercises planes and slots
    assert re.fullmatch(r"[0-9a-f]{64}", prepared.digest)
    for key in META_KEYS:
        assert len(prepared.meta[key]) == n and all(isinstance(v, str)
                                                      for v in prepared.meta[key])
    assert all(set(c) == {"label", "name", "category"} for c in prepared.concepts)
    assert set(prepared.category_kind) == {"pixel", "image"}


def test_batch_holds_the_rows_of_the_arrays(prepared):
    assert spec("batch")[0] == "Batch"
    idx = [5, 0, 17]
    b = prepared.batch(idx)
    assert isinstance(b, Batch) and b.indices.tolist() == idx
    for field in ("images", "planes", "slots", "present"):
        got, full = getattr(b, field), getattr(prepared, field)
        assert got.dtype == full.dtype and got.shape == (len(idx), *full.shape[1:]), field
        assert np.array_equal(got, full[idx]), field


# -- what the other rooms read --------------------------------------------------------------------
def _is_prepared_call(node) -> bool:
    """`PreparedDataset(...)`, also as either side of a conditional expression."""
    if isinstance(node, ast.IfExp):
        return _is_prepared_call(node.body) or _is_prepared_call(node.orelse)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in PREPARED_TYPES)


def _annotated_prepared(annotation) -> bool:
    return annotation is not None and any(
        isinstance(n, ast.Name) and n.id in PREPARED_TYPES for n in ast.walk(annotation))


def _function_names(func) -> set[str]:
    """Names that hold a prepared dataset in a function besides DATASET_NAMES: parameters
    annotated as one, names annotated or assigned as one."""
    names = set()
    args = func.args
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        if _annotated_prepared(a.annotation):
            names.add(a.arg)
    for node in ast.walk(func):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and (_annotated_prepared(node.annotation) or _is_prepared_call(node.value)):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign) and _is_prepared_call(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _holder(node) -> str | None:
    """The name an attribute is read from: `x` of `x.attr`, `ds` of `self.ds.attr`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _reads_in(tree, names: set[str], attrs: set[str], keys: set[str]) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _holder(node.value) in names:
            attrs.add(node.attr)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "meta" and _holder(node.value.value) in names:
            key = node.slice
            keys.add(key.value if isinstance(key, ast.Constant) else ast.unparse(key))


def reads(source: str) -> tuple[set[str], set[str]]:
    """(attributes, meta keys) read of prepared datasets in `source`: anywhere of DATASET_NAMES
    (`ds.x`, `self.ds.x`), and in a function of the names it annotates or assigns as one."""
    tree = ast.parse(source)
    attrs: set[str] = set()
    keys: set[str] = set()
    _reads_in(tree, DATASET_NAMES, attrs, keys)
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            names = _function_names(func)
            if names:
                _reads_in(func, names, attrs, keys)
    return attrs, keys


def test_the_scan_finds_reads():
    source = '''
def f(ds, other):
    return ds.secret, other.ignored, ds.meta["hidden"]

def g(prepared: PreparedDataset, path):
    return prepared.extra, path.exists

def h(x):
    prepared = x if isinstance(x, PreparedDataset) else PreparedDataset(x)
    return prepared.more, self.dataset.deep
'''
    assert reads(source) == ({"secret", "meta", "extra", "more", "deep"}, {"hidden"})


def test_other_rooms_read_only_declared_members():
    declared = set(members())
    undeclared, keys, seen = {}, set(), set()
    for path in READERS:
        attrs, meta_keys = reads(path.read_text())
        seen |= attrs
        keys |= meta_keys
        extra = attrs - declared
        if extra:
            undeclared[str(path.relative_to(PKG))] = sorted(extra)
    assert not undeclared, (
        f"read of a prepared dataset but not declared in data/interface.py (PreparedData): "
        f"{undeclared}"
    )
    assert keys <= set(META_KEYS), f"meta keys read but not in META_KEYS: {sorted(keys)}"
    # the scan sees the readers: the arrays the dissection and visualisation read
    assert {"images", "planes", "slots", "present", "concepts", "meta"} <= seen
