"""Architectures by name, so a new architecture is a new file, not an edit of the trainer or exporter.

An architecture registers a builder ``build(model_cfg, num_classes) -> nn.Module``. The module it builds
takes uint8 images [B, H, W, 3] and returns a ``ReIDOutput`` in training mode and in eval mode alike.
"""

from typing import Callable, Dict


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


ARCHITECTURE_REGISTRY = Registry("architecture")
BACKBONE_REGISTRY = Registry("backbone")
