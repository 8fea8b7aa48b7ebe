"""The refiners: from the radiologist's corrected slices to a whole refined segmentation.

Every refiner gets the same :class:`RefinementInputs` (the image, the expert's labels on the
reviewed voxels, the reviewed mask and the presegmentation ensemble's mean probabilities) and
returns uint8 labels in which **every reviewed voxel is exactly the expert's label** (the
corrected planes stay as the radiologist drew them; :func:`finish` enforces it for all).

=================  ==============================================================================
method             what it does
=================  ==============================================================================
``model``          the refinement nnU-Net (i3Deep, with the prior and distance channels its
                   ``dataset.json`` declares), argmax of its fold-averaged probabilities
``model+rw``       random walker seeded with the corrected planes and pulled towards the
                   refinement network's probabilities (:func:`models.baselines.random_walker_prior_refine`)
``tta``            test-time adaptation of the presegmentation ensemble on the corrected voxels
                   (papers/001), then its prediction
``prior+rw``       random walker seeded with the corrected planes and pulled towards the
                   presegmentation ensemble's probabilities (needs no refinement model)
``random_walker``  random walker seeded with the corrected planes (scikit-image)
``watershed``      marker watershed seeded with the corrected planes
``graph_cut``      Boykov-Jolly graph cut seeded with the corrected planes
``paste``          the presegmentation with the corrected planes pasted in (the floor)
=================  ==============================================================================

Which one the node delivers is a setting (``[refinement] method``); its default is the one
``i3node evaluate`` measured best (see ``benchmarks/README.md``). Model-backed refiners are
built by the composition root (``node.app``) from loaded models; this module never loads one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "CLASSICAL_METHODS",
    "METHODS",
    "ClassicalRefiner",
    "ModelRefiner",
    "ModelRandomWalkerRefiner",
    "PasteRefiner",
    "PriorRandomWalkerRefiner",
    "ProbabilityModel",
    "Refiner",
    "RefinementInputs",
    "TestTimeAdaptationRefiner",
    "finish",
    "make_refiner",
    "resolve_method",
]

METHODS = ("model+rw", "model", "tta", "prior+rw", "random_walker", "watershed", "graph_cut", "paste")
"""Every refinement method, in the order the node falls back through them."""
CLASSICAL_METHODS = ("prior+rw", "random_walker", "watershed", "graph_cut", "paste")
"""Methods that need no network at refinement time."""


@dataclass(frozen=True)
class RefinementInputs:
    """What a refiner gets.

    Attributes
    ----------
    image : np.ndarray
        float32 ``(z, y, x)`` in the series' units (HU for CT).
    spacing : tuple of float
        ``(z, y, x)`` in mm.
    expert : np.ndarray
        uint8 ``(z, y, x)`` labels, valid on ``reviewed`` voxels.
    reviewed : np.ndarray
        bool ``(z, y, x)``: voxels on a slice the radiologist reviewed.
    prior : np.ndarray or None
        float32 ``(C, z, y, x)`` mean probabilities of the presegmentation ensemble.
    n_classes : int
        ``C``, background included.
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    expert: np.ndarray
    reviewed: np.ndarray
    prior: np.ndarray | None
    n_classes: int

    def __post_init__(self) -> None:
        shape = np.shape(self.image)
        if len(shape) != 3:
            raise ValueError(f"image must be (z, y, x), got shape {shape}")
        if np.shape(self.expert) != shape or np.shape(self.reviewed) != shape:
            raise ValueError(f"expert {np.shape(self.expert)} and reviewed {np.shape(self.reviewed)} must have "
                             f"the image's shape {shape}")
        if np.asarray(self.reviewed).dtype != bool:
            raise ValueError("reviewed must be a boolean mask")
        if int(self.n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes!r}")
        if self.prior is not None and np.shape(self.prior) != (int(self.n_classes), *shape):
            raise ValueError(f"prior must have shape {(int(self.n_classes), *shape)}, got {np.shape(self.prior)}")

    def prior_or_error(self, method: str) -> np.ndarray:
        """The prior, or a ValueError naming ``method`` that needs it."""
        if self.prior is None:
            raise ValueError(f"refiner {method!r} needs the presegmentation's probabilities (prior); none given")
        return self.prior


class Refiner(Protocol):
    """Anything that turns :class:`RefinementInputs` into labels."""

    name: str
    version: str

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """uint8 ``(z, y, x)`` labels; reviewed voxels equal ``inputs.expert``."""
        ...


class ProbabilityModel(Protocol):
    """A refinement network: ``models.refinement.RefinementModel`` satisfies it."""

    @property
    def takes_prior(self) -> bool:
        """Whether :meth:`probabilities` needs the prior."""
        ...

    def probabilities(self, image: np.ndarray, spacing: Any, expert_labels: np.ndarray, reviewed: Any,
                      prior: np.ndarray | None = None) -> np.ndarray:
        """``(C, z, y, x)`` class probabilities."""
        ...


def finish(labels: np.ndarray, inputs: RefinementInputs) -> np.ndarray:
    """uint8 ``labels`` with every reviewed voxel set to the expert's label."""
    out = np.asarray(labels).astype(np.uint8, copy=True)
    out[inputs.reviewed] = inputs.expert[inputs.reviewed]
    return out


class PasteRefiner:
    """The presegmentation (argmax of the prior) with the corrected planes pasted in."""

    name = "paste"
    version = "1"

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """See :class:`Refiner`."""
        return finish(np.argmax(inputs.prior_or_error(self.name), axis=0), inputs)


class ClassicalRefiner:
    """A seeded classical method: ``random_walker``, ``watershed`` or ``graph_cut``.

    Parameters
    ----------
    method : str
        One of ``random_walker``, ``watershed``, ``graph_cut``.
    """

    version = "1"

    def __init__(self, method: str) -> None:
        from models import baselines

        functions: dict[str, Callable[..., np.ndarray]] = {
            "random_walker": baselines.random_walker_refine,
            "watershed": baselines.watershed_refine,
            "graph_cut": baselines.graph_cut_refine,
        }
        if method not in functions:
            raise ValueError(f"method must be one of {', '.join(functions)}, got {method!r}")
        self.name = method
        self._fn = functions[method]

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """See :class:`Refiner`."""
        return finish(self._fn(inputs.image, inputs.expert, inputs.reviewed, int(inputs.n_classes)), inputs)


class PriorRandomWalkerRefiner:
    """Random walker seeded with the corrected planes, pulled towards the ensemble's prior.

    Parameters
    ----------
    gamma : float
        Weight of the prior (see :func:`models.baselines.random_walker_prior_refine`).
    """

    name = "prior+rw"

    def __init__(self, gamma: float = 0.03) -> None:
        self.gamma = float(gamma)
        self.version = f"gamma={self.gamma:g}"

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """See :class:`Refiner`."""
        from models.baselines import random_walker_prior_refine

        return finish(random_walker_prior_refine(inputs.image, inputs.expert, inputs.reviewed,
                                                 inputs.prior_or_error(self.name), gamma=self.gamma), inputs)


class ModelRefiner:
    """The refinement network alone: argmax of its probabilities, corrected planes pasted.

    Parameters
    ----------
    model : ProbabilityModel
        The loaded refinement network.
    version : str
        Model version recorded in the SEG (e.g. its folder's name).
    """

    name = "model"

    def __init__(self, model: ProbabilityModel, version: str = "1") -> None:
        self.model = model
        self.version = str(version)

    def probabilities(self, inputs: RefinementInputs) -> np.ndarray:
        """The network's ``(C, z, y, x)`` probabilities for ``inputs``."""
        prior = inputs.prior_or_error(self.name) if self.model.takes_prior else None
        return self.model.probabilities(inputs.image, inputs.spacing, inputs.expert, inputs.reviewed, prior)

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """See :class:`Refiner`."""
        return finish(np.argmax(self.probabilities(inputs), axis=0), inputs)


class ModelRandomWalkerRefiner:
    """Random walker seeded with the corrected planes, pulled towards the refinement network.

    The network carries what it learned (shape, the presegmentation, the corrections); the
    random walker makes the result follow the image's edges between the corrected planes.

    Parameters
    ----------
    model : ModelRefiner
        The refinement network.
    gamma : float
        Weight of the network's probabilities.
    """

    name = "model+rw"

    def __init__(self, model: ModelRefiner, gamma: float = 0.03) -> None:
        self.model = model
        self.gamma = float(gamma)
        self.version = f"{model.version};gamma={self.gamma:g}"

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """See :class:`Refiner`."""
        from models.baselines import random_walker_prior_refine

        probs = self.model.probabilities(inputs)
        return finish(random_walker_prior_refine(inputs.image, inputs.expert, inputs.reviewed, probs,
                                                 gamma=self.gamma), inputs)


class TestTimeAdaptationRefiner:
    """Test-time adaptation of the presegmentation ensemble on the corrected voxels (papers/001).

    Parameters
    ----------
    adapt : callable
        ``adapt(image, spacing, expert, reviewed) -> (C, z, y, x)`` probabilities of the adapted
        ensemble (``models.nnunet.EnsemblePredictor.adapted_probabilities``).
    version : str
        Recorded in the SEG (the presegmentation model and the adaptation schedule).
    """

    __test__ = False  # not a pytest class, despite its name
    name = "tta"

    def __init__(self, adapt: Callable[[np.ndarray, Any, np.ndarray, np.ndarray], np.ndarray],
                 version: str = "1") -> None:
        self._adapt = adapt
        self.version = str(version)

    def refine(self, inputs: RefinementInputs) -> np.ndarray:
        """See :class:`Refiner`."""
        probs = self._adapt(inputs.image, inputs.spacing, inputs.expert, inputs.reviewed)
        return finish(np.argmax(probs, axis=0), inputs)


DEFAULT_METHOD = "model+rw"
"""What ``[refinement] method = "auto"`` delivers: the best in ``i3node evaluate`` (benchmarks/README.md)."""
FALLBACK = "prior+rw"
"""The classical refiner used when neither a refinement model nor test-time adaptation is possible."""


def resolve_method(method: str, *, have_model: bool, have_ensemble: bool) -> tuple[str, str]:
    """The method to run given what is installed, and why when it differs.

    ``auto`` means :data:`DEFAULT_METHOD`. Without a refinement model, ``model`` and
    ``model+rw`` fall back to ``tta`` (papers/001: adapt the presegmentation ensemble); without
    the ensemble too, to :data:`FALLBACK` - never to "no refinement". ``prior+rw`` and ``paste``
    need the presegmentation's probabilities, which every job has.

    Returns
    -------
    method, reason
        ``reason`` is ``""`` when ``method`` runs as asked.
    """
    if method != "auto" and method not in METHODS:
        raise ValueError(f"method must be auto or one of {', '.join(METHODS)}, got {method!r}")
    wanted = DEFAULT_METHOD if method == "auto" else method
    if wanted in ("model", "model+rw") and not have_model:
        if have_ensemble:
            return "tta", f"{wanted} needs a refinement model and none is installed"
        return FALLBACK, f"{wanted} needs a refinement model and none is installed"
    if wanted == "tta" and not have_ensemble:
        return FALLBACK, "tta needs the presegmentation ensemble"
    return wanted, ""


def make_refiner(
    method: str,
    *,
    model: ProbabilityModel | None = None,
    model_version: str = "1",
    adapt: Callable[[np.ndarray, Any, np.ndarray, np.ndarray], np.ndarray] | None = None,
    adapt_version: str = "1",
    gamma: float = 0.03,
) -> Refiner:
    """Build the refiner for ``method`` from already-loaded models.

    Parameters
    ----------
    method : str
        One of :data:`METHODS` (resolve ``auto`` and fallbacks first with :func:`resolve_method`).
    model : ProbabilityModel, optional
        The refinement network (``model``, ``model+rw``).
    model_version : str, optional
        Its version, recorded in SEG provenance.
    adapt : callable, optional
        Test-time adaptation of the ensemble (``tta``).
    adapt_version : str, optional
        Its version.
    gamma : float, optional
        Prior weight of ``model+rw`` and ``prior+rw``.

    Raises
    ------
    ValueError
        For an unknown method or a missing model.
    """
    if method in ("model", "model+rw"):
        if model is None:
            raise ValueError(f"method {method!r} needs a refinement model")
        net = ModelRefiner(model, model_version)
        return net if method == "model" else ModelRandomWalkerRefiner(net, gamma)
    if method == "tta":
        if adapt is None:
            raise ValueError("method 'tta' needs the presegmentation ensemble")
        return TestTimeAdaptationRefiner(adapt, adapt_version)
    if method == "prior+rw":
        return PriorRandomWalkerRefiner(gamma)
    if method == "paste":
        return PasteRefiner()
    if method in ("random_walker", "watershed", "graph_cut"):
        return ClassicalRefiner(method)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
