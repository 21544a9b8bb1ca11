"""Training recipes per kind of model: the defaults of the training keys, chosen by what the model is.

The ``[train]`` defaults (AdamW at 3e-3, one warm-up epoch, 30 epochs, light label smoothing) suit the
convolutional families. A transformer trained with them stays far behind (a small ViT on digits: 56-75%):
it wants a longer schedule, a longer warm-up, stronger weight decay and more label smoothing. So the recipe is
chosen from the model itself (`toolchain.models.recipe_kind`: any attention layer makes it a ``transformer``,
ours or ``torch.nn.MultiheadAttention`` in a user's model), and applied to every key the configuration did not
set: a key given another value than its default in the config file or with ``--set`` always wins
(`Config.explicit`), and ``train.recipe`` names a recipe outright. ``toolchain train``
and ``toolchain compress`` both resolve it, and record it in their reports (``recipe``).

Torch-free: the recipes are plain values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from toolchain.config import Config

#: Per kind of model, ``section.key`` -> value. A key that one recipe sets and another does not takes its
#: section's default under the other.
RECIPES: dict[str, dict[str, Any]] = {
    "convnet": {},
    "transformer": {
        "data.batch_size": 32,
        "train.epochs": 100,
        "train.lr": 2e-3,
        "train.weight_decay": 0.05,
        "train.warmup_epochs": 5,
        "train.patience": 100,  # the cosine schedule runs out: its low-rate tail is where a transformer settles
        "train.label_smoothing": 0.1,
        "prune.lr": 1e-3,
        "distill.lr": 1e-3,
        "distill.epochs": 40,
        "distill.patience": 15,
    },
}


def _governed() -> set[str]:
    return {key for recipe in RECIPES.values() for key in recipe}


def apply_recipe(cfg: Config, kind: str) -> tuple[Config, dict[str, Any]]:
    """``cfg`` with recipe ``kind`` on every governed key the configuration did not set, and the record.

    The record: ``{"name", "values": {key: value used}, "from_config": [keys the configuration set]}``.
    """
    if kind not in RECIPES:
        raise KeyError(f"unknown training recipe {kind!r} (known: {', '.join(RECIPES)})")
    recipe = RECIPES[kind]
    changes: dict[str, dict[str, Any]] = {}
    values: dict[str, Any] = {}
    from_config: list[str] = []
    for key in sorted(_governed()):
        section, name = key.split(".", 1)
        current = getattr(getattr(cfg, section), name)
        default = getattr(type(getattr(cfg, section))(), name)
        # set by the config (file, --set), or in code (dataclasses.replace) to a value no recipe gives it
        chosen = current != default and all(r.get(key, default) != current for r in RECIPES.values())
        if key in cfg.explicit or chosen:
            from_config.append(key)
            values[key] = current
            continue
        value = recipe.get(key, default)
        changes.setdefault(section, {})[name] = value
        values[key] = value
    sections = {sec: dataclasses.replace(getattr(cfg, sec), **kv) for sec, kv in changes.items()}
    return dataclasses.replace(cfg, **sections), {"name": kind, "values": values, "from_config": from_config}


def resolve(cfg: Config, model: Any) -> tuple[Config, dict[str, Any]]:
    """The recipe ``train.recipe`` names, or for ``auto`` the one for ``model`` (a torch module), on ``cfg``."""
    from toolchain.models import recipe_kind

    kind = cfg.train.recipe if cfg.train.recipe != "auto" else recipe_kind(model)
    new, record = apply_recipe(cfg, kind)
    record["chosen_by"] = "train.recipe" if cfg.train.recipe != "auto" else "model"
    return new, record


__all__ = ["RECIPES", "apply_recipe", "resolve"]
