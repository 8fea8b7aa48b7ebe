"""Progress events of long model work (training, evaluation), shared by every module that reports them."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["ProgressEvent", "ProgressCallback", "emit"]


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    Attributes
    ----------
    stage
        ``"write"``, ``"plan"``, ``"preprocess"``, ``"train"``, ``"fold_done"``, ``"done"``
        (``models.demo`` adds ``"cache"``, ``"prior"``; ``models.evaluation`` ``"evaluate"``).
    message
        Human-readable one-line summary.
    fraction
        Completion of the current stage in [0, 1], when known.
    metrics
        Numbers belonging to the event (e.g. ``epoch``, ``train_loss``, ``seconds``).
    """

    stage: str
    message: str
    fraction: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


def emit(progress: ProgressCallback | None, event: ProgressEvent, logger: logging.Logger) -> None:
    """Log ``event`` at INFO on ``logger`` and hand it to ``progress`` (if any)."""
    logger.info("%s: %s", event.stage, event.message)
    if progress is not None:
        progress(event)
