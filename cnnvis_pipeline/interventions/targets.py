"""Which models the intervention rules run for (the workflow reads this at every start, so it
imports neither torch nor any stage): `ablation:` and `adversarial:` sections parsed once with
cnnvis_pipeline.settings, models they name checked against the config's."""

from __future__ import annotations

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Ablation, Adversarial


def _known(section: str, named, models: dict) -> None:
    unknown = sorted(set(named or ()) - set(models))
    if unknown:
        raise CnnvisError(f"config: {section}.models: {unknown} are not among the models")


def ablation_models(config: dict, models: dict, model_spec) -> list[str]:
    """The models an `ablation:` section applies to (those with classification data)."""
    if config.get("ablation") is None:
        return []
    a = Ablation.parse(config["ablation"], config.get("seed", 0))
    _known("ablation", a.models, models)
    return [m for m in models if a.data_for(model_spec(m)) is not None]


def adversarial_models(config: dict, models: dict, model_spec) -> list[str]:
    """The models an `adversarial:` section applies to."""
    if config.get("adversarial") is None:
        return []
    a = Adversarial.parse(config["adversarial"], config.get("seed", 0))
    _known("adversarial", a.models, models)
    return [m for m in models if a.applies_to(model_spec(m))]


def class_index(config: dict, model: str) -> list[str]:
    """The class-index file of a model's ImageFolder data (its content is a rule's input)."""
    entries = (config.get("ablation") or {}).get("models") or {}
    classes = (entries.get(model) or {}).get("classes")
    return [classes] if classes else []
