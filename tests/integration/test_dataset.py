"""The learning loop: a corrected study round-trips into a sparse training set and a new model version.

A real node (demo models) segments a study, the radiologist stand-in corrects exactly the
planes the node asked for, the node refines; ``i3node dataset export`` then writes the
study as an nnU-Net raw dataset with the expert's labels on the reviewed planes and the
``ignore`` label elsewhere, and ``i3node train preseg --from`` trains a new, versioned
ensemble on it (tiny schedule on CPU) that the node's ensemble loader reads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom.codes import default_segment_specs
from dicom.provenance import UidFactory
from dicom.scu import send_datasets, send_paths
from models.phantoms import make_phantom
from models.training import write_raw_dataset
from node.dataset import MODEL_INFO, case_id, load_exports, sparse_labels
from node.demo import correct_named_slices, viewer_style_seg, write_synthetic_study
from node.pipeline import reviewed_from_picks
from node.store import JobState
from tests.fixtures.node_fixtures import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def i3node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO)


@pytest.fixture(scope="module")
def corrected_node(tmp_path_factory: pytest.TempPathFactory, demo_models: Any) -> Any:
    """A node's state after one corrected study: (settings file, settings, study truth, job data)."""
    from node.app import build_app
    from tests.fixtures.node_fixtures import make_settings

    tmp = tmp_path_factory.mktemp("corrected")
    settings = make_settings(tmp, models={"preseg_dir": str(demo_models.preseg_dir),
                                          "refine_dir": str(demo_models.refine_dir), "device": "cpu"},
                             study={"stable_after_s": 0.5})
    app = build_app(settings)
    app.start()
    try:
        paths, gt_file = write_synthetic_study(tmp / "study", seed=41, shape=(24, 48, 48))
        truth = np.load(gt_file)["labels"]
        assert send_paths(paths, ae_title="I3NODE", host="127.0.0.1", port=app.port, calling_ae="PACS").ok
        assert wait_until(lambda: bool(app.store.jobs()) and app.store.jobs()[0]["state"]
                          == JobState.AWAITING_CORRECTION.value, 120)
        (job,) = app.store.jobs()
        data = app.store.job_data(int(job["id"]))
        named = reviewed_from_picks(data["picks"])
        with np.load(settings.outputs_dir / f"job-{job['id']}" / "preseg.npz") as z:
            ai = z["labels"]
        source = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        uids = UidFactory("2.25")
        edit = viewer_style_seg(source, correct_named_slices(ai, truth, named), default_segment_specs(),
                                series_uid=uids.new(), sop_uid=uids.new())
        assert send_datasets([edit], ae_title="I3NODE", host="127.0.0.1", port=app.port, calling_ae="VIEWER").ok
        assert wait_until(lambda: app.store.job(int(job["id"]))["state"] == JobState.DONE.value, 180)
        series_uid = str(job["series_uid"])
        # The AI SEG names the model version that made it.
        from node.app import model_tag

        v1 = [pydicom.dcmread(f) for f in (settings.outputs_dir / f"job-{job['id']}" / "v1").glob("*.dcm")]
        (ai_seg,) = [d for d in v1 if d.Modality == "SEG" and "review" not in str(d.SeriesDescription).lower()]
        algorithm = ai_seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmVersion == model_tag(demo_models.preseg_dir)[:64]
    finally:
        app.stop()
    cfg = tmp / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{settings.state_dir}"\n')
    return cfg, settings, truth, named, series_uid


def test_export_has_the_expert_on_reviewed_planes_and_ignore_elsewhere(corrected_node: Any, tmp_path: Path) -> None:
    cfg, settings, truth, named, series_uid = corrected_node
    out = tmp_path / "export"
    res = i3node("dataset", "export", "--config", str(cfg), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "1 corrected study exported" in res.stdout
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
    cid = case_id(series_uid)
    assert [p.name for p in (out / "labelsTr").iterdir()] == [f"{cid}.nii.gz"]
    assert [p.name for p in (out / "imagesTr").iterdir()] == [f"{cid}_0000.nii.gz"]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{cid}.nii.gz")))
    reviewed = np.zeros(truth.shape, bool)
    for axis, idx in named.items():
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = idx
        reviewed[tuple(sl)] = True
    np.testing.assert_array_equal(lab == 3, ~reviewed)  # ignore exactly where not reviewed
    np.testing.assert_array_equal(lab[reviewed], truth[reviewed])  # the expert, exactly
    img = sitk.ReadImage(str(out / "imagesTr" / f"{cid}_0000.nii.gz"))
    assert img.GetSize() == tuple(reversed(truth.shape))
    # No patient attributes: not in names, not in metadata, not in the image headers.
    blob = (out / "dataset.json").read_text() + "".join(
        str(sitk.ReadImage(str(p)).GetMetaDataKeys()) + "".join(sitk.ReadImage(str(p)).GetMetaData(k)
                                                               for k in sitk.ReadImage(str(p)).GetMetaDataKeys())
        for p in out.rglob("*.nii.gz"))
    for value in ("Phantom", "I3N-0041", series_uid):
        assert value not in blob
    # Reproducible: the same corrections give the same bytes.
    again = tmp_path / "again"
    assert i3node("dataset", "export", "--config", str(cfg), "--out", str(again)).returncode == 0
    for p in out.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (again / p.relative_to(out)).read_bytes(), p.name
    # --since after the correction: nothing to export, said plainly.
    res = i3node("dataset", "export", "--config", str(cfg), "--out", str(tmp_path / "none"), "--since", "2999-01-01")
    assert res.returncode == 1 and "no corrected study to export" in res.stderr


def test_sparse_labels_refuse_a_label_that_is_the_ignore_value() -> None:
    from node.dataset import ExportError

    with pytest.raises(ExportError, match="collides with the ignore value"):
        sparse_labels(np.full((2, 2, 2), 3, np.uint8), np.ones((2, 2, 2), bool), 3)


def test_retraining_from_exports_gives_a_versioned_model_the_node_loads(corrected_node: Any, tmp_path: Path) -> None:
    from models.nnunet import EnsemblePredictor
    from node.app import model_tag

    cfg, *_ = corrected_node
    export = tmp_path / "export"
    assert i3node("dataset", "export", "--config", str(cfg), "--out", str(export)).returncode == 0
    # A second export folder (another site's phantom studies, corrected on three axial planes).
    other = tmp_path / "other"
    phantoms = [make_phantom(500 + i, shape=(24, 48, 48)) for i in range(2)]
    reviewed = np.zeros((24, 48, 48), bool)
    reviewed[[6, 12, 18]] = True
    write_raw_dataset(tmp_path, 0, "other", [p.image for p in phantoms],
                      [sparse_labels(p.labels, reviewed, 3) for p in phantoms], [p.spacing for p in phantoms],
                      {0: "CT"}, {"background": 0, "organ": 1, "lesion": 2, "ignore": 3},
                      case_ids=["site2_a", "site2_b"], folder=other)
    cases, classes, _ = load_exports([export, other])
    assert len(cases) == 3 and classes == ("background", "organ", "lesion")
    models_root = tmp_path / "models"
    res = i3node("train", "preseg", "--from", str(export), "--from", str(other), "--out", str(models_root),
                 "--folds", "2", "--epochs", "1", "--iterations", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    model_dir = Path(res.stdout.split("new presegmentation model: ", 1)[1].splitlines()[0])
    assert model_dir.is_dir() and model_dir.is_relative_to(models_root)
    info = json.loads((model_dir / MODEL_INFO).read_text())
    assert info["version"].startswith("preseg-") and info["ignore_label"] is True and info["cases"] == 3
    assert set(info["trained_from"]) == {"export", "other"}
    assert "preseg_dir" in res.stdout  # the operator is told how to switch; the node does not switch itself
    assert model_tag(model_dir).startswith(info["version"])
    probs = EnsemblePredictor(model_dir, device="cpu").predict_members(phantoms[0].image, phantoms[0].spacing)
    assert probs.shape[:2] == (2, 3)  # two folds, three classes (no 'ignore' channel)
