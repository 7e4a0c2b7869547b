"""Build the model a config entry describes, and load its weights safely.

- build_model(name, spec): an nn.Module in eval mode and a provenance dict. A spec names exactly
  one source:
    arch: synthnet                      the built-in reference CNN (kwargs: width, num_classes)
    torchvision: resnet18, weights: IMAGENET1K_V1 | DEFAULT | null (seeded random)
    factory: "package.module:callable"  any importable callable returning an nn.Module
  plus optional `checkpoint` (a state dict read with torch.load(weights_only=True)), `kwargs`,
  `seed` (the random initialisation when there are no weights); a spec's `layouts` are not the
  model's: every caller passes them to the hooks (`layouts=spec["layouts"]`). A synthnet without `kwargs.num_classes` takes its
  class count from its checkpoint (a `train:` model has one class per label of its category).
- build_architecture(name, spec): the same module with its parameters on the meta device (no
  weights read, no memory, no initialisation compute; buffers stay real): the module names and,
  after `materialize`, every output shape (the model check at `snakemake -n`).
- materialize(model, max_cpu_parameters): zero parameters on the CPU (returns "cpu") when the
  model has at most that many, else the buffers too on the meta device (returns "meta": a
  forward computes shapes only, at the one-time cost of importing torch's meta kernels).
- check_weights_name(arch, weights, where): a torchvision weights name checked against the
  architecture's weights enum, without downloading anything.
- load_state_dict_file(path): a checkpoint as a state dict; a file that is neither a zip nor a
  pickle (a text file) is not a checkpoint; pickled code in a real one is refused.
- file_sha256(path).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pickled_message(path: Path, e: Exception) -> str:
    """What was refused and why, and how to make a loadable file. Of torch's message only the
    name of the refused global is kept (its advice is to load the file unsafely)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(
        r"Unsupported (?:operand|class|global)[: ]+([^\s.,;]+)", text)
    what = f" ({m.group(1)})" if m else ""
    return (
        f"{path}: refused: the checkpoint holds pickled objects or code{what} that a plain state "
        "dict never contains, and loading them could run code. Save the weights alone, "
        "torch.save(model.state_dict(), path), and give that file as checkpoint"
    )


def load_state_dict_file(path: str | Path, *, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CnnvisError(f"{where}: checkpoint file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; the legacy format is a pickle (protocol >= 2: 0x80).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CnnvisError(f"{path}: not a readable PyTorch checkpoint: not a zip or pickle file "
                          f"({where}: give a state dict written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CnnvisError(_pickled_message(path, e)) from None
    except Exception as e:  # arbitrary bytes fail in many ways (KeyError, struct.error, ...)
        raise CnnvisError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        bad = next((f"{k!r}: {type(v).__name__}" for k, v in obj.items()
                    if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None) \
            if isinstance(obj, dict) else None
        got = ("an empty dict" if isinstance(obj, dict) and not obj
               else f"a dict with a non-tensor entry ({bad[:80]})" if bad
               else type(obj).__name__)
        raise CnnvisError(
            f"{path}: not a state dict (expected a mapping of parameter names to tensors, "
            f"got {got})"
        )
    return obj


def _import_factory(ref: str, where: str):
    if not isinstance(ref, str) or ":" not in ref:
        raise CnnvisError(f"{where}: factory must look like 'package.module:callable', got {ref!r}")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CnnvisError(
            f"{where}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CnnvisError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CnnvisError(f"{where}: {ref!r} is not callable")
    return obj


def _torchvision_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _check_arch(arch: str, where: str) -> None:
    available = _torchvision_archs()
    if arch not in available:
        raise CnnvisError(
            f"{where}: unknown torchvision model {arch!r}; known: {', '.join(sorted(available))}"
        )


def check_weights_name(arch: str, weights, where: str):
    """The weights enum member `weights` names (None for random weights); nothing is
    downloaded."""
    import torchvision

    if weights in (None, "", "none", "random"):
        return None
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise CnnvisError(f"{where}.weights: unknown weights {weights!r} for {arch}; known: "
                          f"{names}") from None


def _torchvision_model(arch: str, weights, where: str, kwargs: dict | None = None) -> nn.Module:
    import torchvision

    _check_arch(arch, where)
    kwargs = dict(kwargs or {})
    w = check_weights_name(arch, weights, where)
    try:
        return torchvision.models.get_model(arch, weights=w, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        given = f"weights={weights}, " if w is not None else ""
        raise CnnvisError(f"{where}: torchvision {arch}({given}**{kwargs}) failed: {e}") from None
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise CnnvisError(
            f"{where}: cannot get weights {w} for {arch} from {w.url} ({str(e)[:160]}). On an "
            f"offline node, copy the file {Path(w.url).name} into {hub} (TORCH_HOME), or give "
            "the model a `checkpoint:` state dict"
        ) from None


@contextlib.contextmanager
def _meta_parameters():
    """Every parameter registered meanwhile is moved to the meta device as it is registered: the
    initialisation that follows computes nothing, while the constructor's own arithmetic
    (RegNet's widths) and the buffers (Swin's relative position index) stay real."""
    register_parameter = nn.Module.register_parameter

    def parameter(self, name, param):
        register_parameter(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"),
                                                  requires_grad=param.requires_grad)

    nn.Module.register_parameter = parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def build_architecture(name: str, spec: dict) -> nn.Module:
    """The architecture of a synthnet or torchvision entry with its parameters on the meta
    device: no checkpoint or weights are read (the weights name is checked separately)."""
    where = f"config: models.{name}"
    kwargs = dict(spec.get("kwargs") or {})
    with _meta_parameters():
        if spec.get("arch") == "synthnet":
            from cnnvis_pipeline.models.synthnet import SynthNet

            try:
                return SynthNet(**kwargs).eval()
            except TypeError as e:
                raise CnnvisError(f"{where}.kwargs: synthnet(**{kwargs}) failed: {e}") from None
        if spec.get("arch"):
            raise CnnvisError(f"{where}: unknown arch {spec['arch']!r} (built-in: synthnet)")
        return _torchvision_model(spec["torchvision"], None, where, kwargs).eval()


def materialize(model: nn.Module, max_cpu_parameters: int) -> str:
    params = [(m, n, p) for m in model.modules() for n, p in m._parameters.items()
              if p is not None]
    if sum(p.numel() for _m, _n, p in params) > max_cpu_parameters:
        model.to("meta")
        return "meta"
    for m, n, p in params:
        m._parameters[n] = nn.Parameter(torch.zeros(p.shape), requires_grad=p.requires_grad)
    return "cpu"


def build_model(name: str, spec: dict) -> tuple[nn.Module, dict]:
    """The module of one config entry, in eval mode on the CPU, and its provenance."""
    where = f"config: models.{name}"
    sources = [k for k in ("arch", "torchvision", "factory") if spec.get(k)]
    if len(sources) != 1:
        raise CnnvisError(f"{where}: give exactly one of arch, torchvision, factory (got {sources})")
    torch.manual_seed(int(spec.get("seed", 0)))
    kwargs = dict(spec.get("kwargs") or {})
    info = {"source": sources[0], "checkpoint": None, "checkpoint_sha256": None}
    ckpt = spec.get("checkpoint")
    state = load_state_dict_file(ckpt, where=f"{where}.checkpoint") if ckpt else None
    if spec.get("arch"):
        if spec["arch"] != "synthnet":
            raise CnnvisError(f"{where}: unknown arch {spec['arch']!r} (built-in: synthnet)")
        from cnnvis_pipeline.models.synthnet import SynthNet

        head = state.get("classifier.weight") if state is not None else None
        if "num_classes" not in kwargs and head is not None and head.dim() == 2:
            kwargs["num_classes"] = int(head.shape[0])
        model = SynthNet(**kwargs)
    elif spec.get("torchvision"):
        model = _torchvision_model(spec["torchvision"], spec.get("weights"), where, kwargs)
        info["weights"] = spec.get("weights")
    else:
        factory = _import_factory(spec["factory"], where)
        try:
            model = factory(**kwargs)
        except Exception as e:
            raise CnnvisError(f"{where}: factory {spec['factory']!r} failed: {e!r}") from None
        if not isinstance(model, nn.Module):
            raise CnnvisError(
                f"{where}: factory {spec['factory']!r} returned {type(model).__name__}, not an nn.Module"
            )
    if ckpt:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # torch lists the problems on the lines after the first
            lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e)]
            detail = "; ".join(ln if len(ln) <= 200 else ln[:200] + " ..." for ln in lines[:4])
            raise CnnvisError(f"{ckpt}: does not fit model {name!r}: {detail}") from None
        info["checkpoint"] = str(ckpt)
        info["checkpoint_sha256"] = file_sha256(ckpt)
    return model.eval(), info
