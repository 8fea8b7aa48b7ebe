"""Intensity statistics of sparse labels: the ignore label is not foreground."""
from __future__ import annotations

import numpy as np
import pytest

from models.training import TrainingError, annotated_intensity_properties


def test_unannotated_air_does_not_widen_the_ct_window() -> None:
    image = np.full((4, 8, 8), -1000.0, np.float32)  # air everywhere ...
    image[:, 2:6, 2:6] = 40.0  # ... soft tissue in the middle
    image[:, 3, 3] = 200.0  # a hyperdense lesion
    labels = np.full(image.shape, 3, np.uint8)  # ignore: nobody annotated it
    labels[1] = 0  # one reviewed plane: background ...
    labels[1, 2:6, 2:6] = 1  # ... organ
    labels[1, 3, 3] = 2  # ... and the lesion
    props = annotated_intensity_properties([image], [labels], ignore_value=3)
    assert props["min"] == 40.0 and props["max"] == 200.0
    assert props["percentile_00_5"] >= 40.0  # nnU-Net's own fingerprint (label > 0) would put it at -1000
    naive = image[labels > 0]
    assert np.percentile(naive, 0.5) == -1000.0


def test_no_annotated_foreground_is_an_error() -> None:
    with pytest.raises(TrainingError, match="no annotated foreground"):
        annotated_intensity_properties([np.zeros((2, 2, 2))], [np.full((2, 2, 2), 3, np.uint8)], 3)
