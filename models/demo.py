"""Tiny demo models trained on seeded phantoms, cached on disk.

:func:`build_demo_models` trains (once per machine and specification) a presegmentation
deep ensemble (one nnU-Net fold per member) and, when available, a refinement model, both on
seeded phantoms from ``models.phantoms``. Results are cached under
``cache_dir/preseg-<hash>/`` and ``cache_dir/refine-<hash>/``; each folder gets its
``COMPLETE.json`` marker last and is built under an exclusive ``fcntl`` file lock, so
concurrent processes (e.g. parallel pytest runs) build it once and reruns are instant.

Importing this module is cheap (no torch); training runs in child processes
(see ``models.training``).

The demo recipe (measured with ``i3node evaluate``, see ``benchmarks/README.md``)
-------------------------------------------------------------------------------
* presegmentation: 3 folds of the tiny trainer (SGD momentum 0.9, lr 0.05) for 15 x 20
  iterations on 12 phantoms (base seed 11), trained concurrently;
* refinement: ``DemoSpec.n_refine`` fresh phantoms (base seed 13, never seen by the
  ensemble) are presegmented by the ensemble exactly as the node does at inference; their
  mean probabilities are the prior channels of a refinement network that also takes the
  corrections and distance channels, trained with the node's own slice selection on that
  prior and with damaged priors 30 % of the time (``ReviewSimulation.p_bad_prior``).

Refinement extension point
--------------------------
``build_demo_models(..., refinement_builder=f)`` calls ``f(request)`` with a
:class:`RefinementRequest` and expects the refinement model's nnU-Net results folder back.
Without an explicit builder the recipe above is used; its cache key includes the source of
the modules that define it (``refinement.py``, ``refinement_training.py``,
``nnunet_trainers.py``), so a change there retrains only the refinement model.
``with_refinement=False`` skips it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.progress import ProgressCallback, ProgressEvent, emit
from models.training import NetworkOverrides

__all__ = [
    "DemoSpec",
    "DemoModels",
    "RefinementRequest",
    "RefinementBuilder",
    "build_demo_models",
    "training_phantoms",
    "refinement_phantoms",
    "ensemble_priors",
    "held_out_phantoms",
    "HELD_OUT_SEED",
]

log = logging.getLogger(__name__)

#: Bump to invalidate every cached presegmentation model (training recipe changed).
_PRESEG_VERSION = "2"
#: Bump to invalidate every cached refinement model.
_REFINE_VERSION = "2"
#: ``make_phantoms`` base seed for held-out cases (disjoint from the training seed).
HELD_OUT_SEED = 77
_MARKER = "COMPLETE.json"


@dataclass(frozen=True)
class DemoSpec:
    """What the demo models are trained on and how (part of the cache key).

    Attributes
    ----------
    n_train
        Training phantoms of the ensemble (``make_phantoms(n_train, seed=seed)``).
    seed
        ``make_phantoms`` base seed of the training set (phantom ``i`` has seed ``seed*1000+i``).
    shape, spacing
        Phantom shape and spacing (z, y, x).
    folds
        Presegmentation folds = ensemble members (``folds``-fold cross-validation).
    epochs, iterations_per_epoch, val_iterations
        Training schedule per fold.
    overrides
        Network and patch size.
    n_refine, refine_seed
        Refinement training phantoms (``make_phantoms(n_refine, seed=refine_seed)``),
        presegmented by the ensemble for the prior channels.
    refine_epochs, refine_iterations_per_epoch
        Refinement training schedule.
    """

    n_train: int = 12
    seed: int = 11
    shape: tuple[int, int, int] = (32, 64, 64)
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5)
    folds: int = 3
    epochs: int = 15
    iterations_per_epoch: int = 20
    val_iterations: int = 1
    overrides: NetworkOverrides = field(default_factory=NetworkOverrides)
    n_refine: int = 16
    refine_seed: int = 13
    refine_epochs: int = 12
    refine_iterations_per_epoch: int = 20

    def key(self) -> str:
        """Hash of the specification and of the training data it produces (16 hex digits).

        The data fingerprint (the first training phantom's image and labels) makes a
        change to the phantom generator invalidate cached models, not only a change
        of this specification.
        """
        first = training_phantoms(dataclasses.replace(self, n_train=1))[0]
        data = hashlib.sha256(first.image.tobytes() + first.labels.tobytes()).hexdigest()[:16]
        preseg_fields = {k: v for k, v in dataclasses.asdict(self).items()
                         if k not in ("n_refine", "refine_seed", "refine_epochs", "refine_iterations_per_epoch")}
        payload = json.dumps({"version": _PRESEG_VERSION, "data": data, **preseg_fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RefinementRequest:
    """Input handed to a refinement builder.

    Attributes
    ----------
    cases
        Training phantoms (``models.phantoms.Phantom``), the same as the presegmentation's.
    out_dir
        Empty work folder to train in (kept as the cache entry).
    preseg_dir
        The presegmentation results folder (if the builder wants it).
    spec
        The demo specification.
    seed
        Seed to use.
    progress
        Progress callback (may be ``None``).
    """

    cases: Sequence[Any]
    out_dir: Path
    preseg_dir: Path
    spec: DemoSpec
    seed: int
    progress: ProgressCallback | None


RefinementBuilder = Callable[[RefinementRequest], Path]


@dataclass(frozen=True)
class DemoModels:
    """Paths of built demo models.

    Attributes
    ----------
    preseg_dir
        nnU-Net results folder of the presegmentation ensemble (``folds`` folds), for
        ``models.nnunet.EnsemblePredictor``.
    refine_dir
        nnU-Net results folder of the refinement model, or ``None`` when none was built.
    spec_hash
        Cache key of this combination (presegmentation key, plus refinement key if any).
    spec
        The specification used.
    build_seconds
        Training time per part as recorded when the cache entry was built
        (``{"preseg": s, "refine": s}``); cache hits return the recorded values.
    """

    preseg_dir: Path
    refine_dir: Path | None
    spec_hash: str
    spec: DemoSpec
    build_seconds: dict[str, float]


def training_phantoms(spec: DemoSpec) -> list[Any]:
    """The phantoms the demo models are trained on."""
    from models.phantoms import make_phantoms

    return make_phantoms(spec.n_train, seed=spec.seed, shape=spec.shape, spacing=spec.spacing)


def held_out_phantoms(n: int, spec: DemoSpec | None = None, *, seed: int = HELD_OUT_SEED) -> list[Any]:
    """Phantoms never used for training (different ``make_phantoms`` base seed)."""
    from models.phantoms import make_phantoms

    spec = spec or DemoSpec()
    if seed == spec.seed:
        raise ValueError(f"seed: {seed} is the training seed; held-out phantoms need another")
    return make_phantoms(n, seed=seed, shape=spec.shape, spacing=spec.spacing)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_marker(entry: Path) -> dict[str, Any] | None:
    marker = entry / _MARKER
    if not marker.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not (entry / data.get("model", "\0")).is_dir():
        return None
    return data


def _cached_build(entry: Path, force: bool, progress: ProgressCallback | None, what: str,
                  build: Callable[[Path], Path]) -> tuple[Path, float]:
    """Return (model folder, build seconds) for ``entry``, building it under a lock if needed."""
    with _locked(entry.parent / f"{entry.name}.lock"):
        data = None if force else _read_marker(entry)
        if data is not None:
            emit(progress, ProgressEvent("cache", f"{what}: cached in {entry}", 1.0), log)
            return entry / data["model"], float(data.get("seconds", 0.0))
        if entry.exists():
            shutil.rmtree(entry)
        entry.mkdir(parents=True)
        t0 = time.perf_counter()
        model = Path(build(entry)).resolve()
        seconds = time.perf_counter() - t0
        try:
            rel = model.relative_to(entry.resolve())
        except ValueError as exc:
            raise RuntimeError(f"{what}: builder returned {model}, outside its folder {entry}") from exc
        tmp = entry / (_MARKER + ".tmp")
        tmp.write_text(json.dumps({"model": str(rel), "seconds": seconds}, indent=2))
        tmp.replace(entry / _MARKER)
        emit(progress, ProgressEvent("cache", f"{what}: built in {seconds:.0f} s", 1.0, {"seconds": seconds}), log)
        return model, seconds


def refinement_phantoms(spec: DemoSpec) -> list[Any]:
    """The phantoms the demo refinement model is trained on (never seen by the ensemble)."""
    from models.phantoms import make_phantoms

    return make_phantoms(spec.n_refine, seed=spec.refine_seed, shape=spec.shape, spacing=spec.spacing)


def ensemble_priors(preseg_dir: Path, cases: Sequence[Any], device: str | None = None,
                    progress: ProgressCallback | None = None) -> list[Any]:
    """The ensemble's mean probabilities on each case, as the node computes them at inference."""
    from models.nnunet import EnsemblePredictor
    from models.uncertainty import EnsembleAccumulator

    t0 = time.perf_counter()
    ensemble = EnsemblePredictor(preseg_dir, device=device)
    priors = []
    for i, case in enumerate(cases):
        acc = EnsembleAccumulator()
        for member in ensemble.iter_members(case.image, case.spacing):
            acc.add(member)
        priors.append(acc.mean())
        emit(progress, ProgressEvent("prior", f"presegmented refinement case {i + 1}/{len(cases)}",
                                      (i + 1) / len(cases)), log)
    emit(progress, ProgressEvent("prior", f"ensemble priors of {len(cases)} cases in {time.perf_counter() - t0:.0f} s",
                                  1.0), log)
    return priors


def _source_version(*modules: str) -> str:
    h = hashlib.sha256(_REFINE_VERSION.encode())
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def _default_refinement_builder(device: str | None) -> tuple[RefinementBuilder, str]:
    """The demo recipe (module docstring) and its cache version."""

    def builder(req: RefinementRequest) -> Path:
        from models.refinement_training import ReviewSimulation, train_refinement_model

        cases = refinement_phantoms(req.spec)
        priors = ensemble_priors(req.preseg_dir, cases, device, req.progress)
        return Path(train_refinement_model(
            cases, req.out_dir, priors=priors, distance=True, ignore_reviewed=True,
            simulation=ReviewSimulation(p_bad_prior=0.3), epochs=req.spec.refine_epochs,
            iterations_per_epoch=req.spec.refine_iterations_per_epoch, device=device, seed=req.seed,
            progress=req.progress, plans_from=req.preseg_dir))

    version = _source_version("models.refinement", "models.refinement_training", "models.nnunet_trainers")
    return builder, version


def build_demo_models(
    cache_dir: Path,
    *,
    spec: DemoSpec | None = None,
    progress: ProgressCallback | None = None,
    force: bool = False,
    with_refinement: bool = True,
    refinement_builder: RefinementBuilder | None = None,
    refinement_version: str = "",
    device: str | None = None,
) -> DemoModels:
    """Build (or load from cache) the demo presegmentation ensemble and refinement model.

    Parameters
    ----------
    cache_dir
        Cache root, e.g. ``<repo>/.cache/demo-models``.
    spec
        Training specification; default :class:`DemoSpec` ``()``.
    progress
        Receives :class:`models.training.ProgressEvent` objects (``cache``, ``plan``,
        ``train``...).
    force
        Rebuild even when a complete cache entry exists.
    with_refinement
        Also build the refinement model (see the module docstring).
    refinement_builder
        Explicit refinement builder; default: ``models.refinement_training`` if present.
    refinement_version
        Cache-key string for an explicit ``refinement_builder`` (change it to rebuild).
    device
        Training device; default CUDA when available, else CPU.

    Returns
    -------
    DemoModels
    """
    from models.training import train_presegmentation

    spec = spec or DemoSpec()
    cache_dir = Path(cache_dir)
    preseg_key = spec.key()
    cases: list[Any] = []

    def build_preseg(entry: Path) -> Path:
        cases[:] = cases or training_phantoms(spec)
        return train_presegmentation(
            cases, entry, folds=spec.folds, epochs=spec.epochs, iterations_per_epoch=spec.iterations_per_epoch,
            val_iterations=spec.val_iterations, overrides=spec.overrides, class_names=("background", "organ", "lesion"),
            device=device, seed=spec.seed, progress=progress)

    preseg_dir, preseg_s = _cached_build(cache_dir / f"preseg-{preseg_key}", force, progress,
                                         "presegmentation", build_preseg)
    seconds = {"preseg": preseg_s}
    refine_dir: Path | None = None
    spec_hash = preseg_key
    if with_refinement:
        builder, version = (refinement_builder, refinement_version) if refinement_builder is not None \
            else _default_refinement_builder(device)
        if builder is not None:
            refine_fields = {k: getattr(spec, k) for k in ("n_refine", "refine_seed", "refine_epochs",
                                                            "refine_iterations_per_epoch")}
            refine_key = hashlib.sha256(f"{preseg_key}|{version}|{sorted(refine_fields.items())}".encode()
                                        ).hexdigest()[:16]
            spec_hash = f"{preseg_key}-{refine_key}"
            found_builder = builder

            def build_refine(entry: Path) -> Path:
                cases[:] = cases or training_phantoms(spec)
                req = RefinementRequest(cases=list(cases), out_dir=entry, preseg_dir=preseg_dir, spec=spec,
                                        seed=spec.seed, progress=progress)
                return found_builder(req)

            refine_dir, refine_s = _cached_build(cache_dir / f"refine-{refine_key}", force, progress,
                                                 "refinement", build_refine)
            seconds["refine"] = refine_s
    return DemoModels(preseg_dir=preseg_dir, refine_dir=refine_dir, spec_hash=spec_hash, spec=spec,
                      build_seconds=seconds)
