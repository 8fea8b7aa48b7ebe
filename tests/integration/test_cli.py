"""The ``i3node`` command line and the staged service install, run as real processes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def i3node(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO)


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[dicom]\nport = 'eleven'\n")
    res = i3node("status", "--config", str(cfg))
    assert res.returncode == 2
    assert "dicom.port: expected an integer" in res.stderr


def test_bad_peer_is_a_usage_error(tmp_path: Path) -> None:
    res = i3node("echo", "--to", "nonsense")
    assert res.returncode == 2 and "AE@HOST:PORT" in res.stderr


def test_make_study_send_status_and_purge_dry_run(node_factory, tmp_path: Path) -> None:
    app = node_factory(node={"job_workers": 0}, study={"stable_after_s": 0.5})
    out = tmp_path / "study"
    res = i3node("make-study", str(out), "--seed", "3", "--shape", "16x24x24")
    assert res.returncode == 0, res.stderr
    assert len(list((out / "dicom").glob("*.dcm"))) == 16 and (out / "ground_truth.npz").is_file()
    res = i3node("send", str(out / "dicom"), "--to", f"I3NODE@127.0.0.1:{app.port}")
    assert res.returncode == 0, res.stderr
    assert "16 success, 0 warning, 0 failure" in res.stdout
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{app.settings.state_dir}"\n')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not app.store.jobs():
        time.sleep(0.2)
    res = i3node("status", "--config", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    assert snap["studies"][0]["n_instances"] == 16 and snap["job_counts"] == {"queued": 1}
    text = i3node("status", "--config", str(cfg)).stdout
    assert "Studies (1)" in text and "queued" in text
    for forbidden in ("Phantom", "I3N-0003", "19700101"):
        assert forbidden not in res.stdout + text, "status must not show patient attributes"
    res = i3node("purge", "--config", str(cfg), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert app.store.count_instances() == 16


def test_retry_unknown_job(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path}"\n')
    res = i3node("retry", "42", "--config", str(cfg))
    assert res.returncode == 2 and "job 42 does not exist" in res.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_install_service_staged_layout(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    res = subprocess.run(["make", "-s", "install-service", f"DESTDIR={stage}", "GPU=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    unit = stage / "etc/systemd/system/i3node.service"
    assert unit.read_text() == (REPO / "systemd/i3node.service").read_text()
    assert (stage / "etc/systemd/system/i3node.service.d/gpu.conf").is_file()
    assert (stage / "opt/i3node/src/pyproject.toml").is_file()
    cfg = stage / "etc/i3node/i3node.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o640"
    s = load_settings(cfg)
    assert s.state_dir == Path("/var/lib/i3node")
    assert s.model_cache_dir == Path("/var/cache/i3node/demo-models")


def test_train_reads_nifti_folders_and_names_what_is_wrong(tmp_path: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from node.cli import UsageError, load_nifti_cases

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.75, 2.0))  # x, y, z
    sitk.WriteImage(img, str(images / "case1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((arr > 50).astype(np.uint8)), str(labels / "case1.nii.gz"))
    (case,) = load_nifti_cases(images, labels)
    np.testing.assert_array_equal(case.image, arr)
    assert case.spacing == (2.0, 0.75, 0.5) and case.labels.sum() == (arr > 50).sum()
    sitk.WriteImage(img, str(images / "case2.nii.gz"))
    with pytest.raises(UsageError, match="case2.nii.gz: label file for case2.nii.gz is missing"):
        load_nifti_cases(images, labels)
    res = i3node("train", "preseg", "--images", str(tmp_path / "nope"), "--labels", str(labels), "--out", str(tmp_path))
    assert res.returncode == 2 and "not a folder" in res.stderr
