"""Which layers the draft drops.

``choose_layers`` turns an ``ExportConfig`` and the model's layer count into a
``LayerChoice``. With ``--drop-layers`` the user's list is used as given; with ``--prune``
a chooser from ``make_chooser(method)`` picks the layers. Layer scoring (a later issue)
plugs in here as more methods; until then the only method is the "even" placeholder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from exporters.config import MANUAL_METHOD, ExportConfig

log = logging.getLogger(__name__)

# (n_layers, n_drop) -> sorted indices of the layers to drop
Chooser = Callable[[int, int], list[int]]


@dataclass(frozen=True)
class LayerChoice:
    n_layers: int
    dropped: tuple[int, ...]
    method: str

    @property
    def kept(self) -> tuple[int, ...]:
        gone = set(self.dropped)
        return tuple(i for i in range(self.n_layers) if i not in gone)

    @property
    def ratio(self) -> float:
        return len(self.dropped) / self.n_layers


def drop_evenly(n_layers: int, n_drop: int) -> list[int]:
    """Placeholder rule: drop ``n_drop`` evenly spaced layers, never the first or last.

    The middle layers 1..n-2 are cut into ``n_drop`` equal stretches and the layer at the
    centre of each stretch is dropped. The first layer turns token embeddings into the
    residual stream and the last feeds the output head, so both always stay.
    """
    middle = n_layers - 2
    if not 0 < n_drop <= middle:
        raise ValueError(f"the 'even' rule keeps the first and last layer, so it can drop "
                         f"1 to {max(middle, 0)} of {n_layers} layers; asked for {n_drop}")
    # centre of stretch i is (i + 0.5) * middle / n_drop; stretches are >= 1 layer wide,
    # so the picks are distinct
    return [1 + int((i + 0.5) * middle / n_drop) for i in range(n_drop)]


_CHOOSERS: dict[str, Chooser] = {"even": drop_evenly}


def make_chooser(method: str) -> Chooser:
    """The layer chooser for ``method`` (see ``exporters.config.METHODS``)."""
    try:
        return _CHOOSERS[method]
    except KeyError:
        raise ValueError(f"no layer chooser for method {method!r}; "
                         f"known: {', '.join(_CHOOSERS)}") from None


def choose_layers(cfg: ExportConfig, n_layers: int) -> LayerChoice:
    """Validate the requested pruning against ``n_layers`` and pick the layers to drop."""
    if cfg.drop_layers is not None:
        bad = [i for i in cfg.drop_layers if i >= n_layers]
        if bad:
            raise ValueError(f"--drop-layers {bad[0]} is out of range: the model has "
                             f"{n_layers} layers, numbered 0 to {n_layers - 1}")
        if len(cfg.drop_layers) >= n_layers:
            raise ValueError(f"--drop-layers drops all {n_layers} layers; keep at least one")
        return LayerChoice(n_layers, tuple(cfg.drop_layers), MANUAL_METHOD)

    assert cfg.prune is not None  # ExportConfig fills in the default
    n_drop = round(cfg.prune * n_layers)
    if n_drop == 0:
        raise ValueError(f"--prune {cfg.prune} drops no layer of {n_layers}; "
                         f"use at least {1 / n_layers:.3f}")
    if n_drop >= n_layers:
        raise ValueError(f"--prune {cfg.prune} drops {n_drop} of {n_layers} layers and "
                         "leaves none; use a smaller ratio")
    dropped = make_chooser(cfg.method)(n_layers, n_drop)
    log.info("dropping %d of %d layers %s by the '%s' placeholder rule (evenly spaced, "
             "never the first or last); layer scoring will choose them in a later version",
             n_drop, n_layers, dropped, cfg.method)
    return LayerChoice(n_layers, tuple(sorted(dropped)), cfg.method)
