"""Architectures by name, so a new architecture is a new file, not an edit of the trainer or exporter.

An architecture registers a builder ``build(model_cfg, num_classes) -> nn.Module``, and the config keys only it
reads as an options dataclass in ``MODEL_OPTIONS_REGISTRY``. The module it builds
takes uint8 images [B, H, W, 3] and returns a ``ReIDOutput`` in training mode and in eval mode alike.
"""

from dataclasses import field, fields
from typing import Callable, Dict, List, Tuple


class Registry:
    """A name -> object table with a helpful error for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(obj: Callable) -> Callable:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> Callable:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list:
        return sorted(self._items)

    def items(self) -> List[Tuple[str, Callable]]:
        return sorted(self._items.items())


def option(default, help: str, **kwargs):
    """A config field with its help text (``python -m training train --help`` prints it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


ARCHITECTURE_REGISTRY = Registry("architecture")
BACKBONE_REGISTRY = Registry("backbone")
# An architecture's own ``model.*`` config keys: a dataclass of ``option`` fields, registered under its name next to
# its code (as fast-reid's add_*_config); the training config offers every registered class's keys.
MODEL_OPTIONS_REGISTRY = Registry("model options")


def options_of(options_class, model_cfg: dict):
    """The architecture's options from a model config dict: its values where the dict has them, the class's
    defaults elsewhere (a builder's one source of defaults, also for dicts a test writes by hand)."""
    return options_class(
        **{spec.name: model_cfg[spec.name] for spec in fields(options_class) if spec.name in model_cfg}
    )
