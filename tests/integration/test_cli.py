"""The ``i3node`` command line and the staged service install, run as real processes."""
from __future__ import annotations

import json
import re
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
    assert snap["studies"][0]["n_instances"] == 16 and snap["counts"]["jobs"] == {"queued": 1}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", snap["studies"][0]["last_received_at"])
    assert isinstance(snap["jobs"][0]["data"], dict), "one JSON document, no JSON inside strings"
    text = i3node("status", "--config", str(cfg)).stdout
    assert "Studies (1 of 1)" in text and "queued" in text
    filtered = json.loads(i3node("status", "--config", str(cfg), "--json", "--state", "failed").stdout)
    assert filtered["jobs"] == [] and filtered["studies"] == [] and filtered["counts"]["jobs"] == {"queued": 1}
    assert i3node("status", "--config", str(cfg), "--state", "nonsense").returncode == 2
    for forbidden in ("Phantom", "I3N-0003", "19700101"):
        assert forbidden not in res.stdout + text, "status must not show patient attributes"
    res = i3node("purge", "--config", str(cfg), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert app.store.count_instances() == 16


def test_retry_unknown_job(tmp_path: Path) -> None:
    from node.store import Store

    Store(f"sqlite:///{tmp_path / 'i3node.db'}").close()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path}"\n')
    res = i3node("retry", "42", "--config", str(cfg))
    assert res.returncode == 2 and "job 42 does not exist" in res.stderr


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("retry", "1"), ("purge", "--dry-run")])
def test_mistyped_state_dir_is_an_error_and_creates_nothing(tmp_path: Path, command: tuple[str, ...]) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path / "typo"}"\n')
    res = i3node(*command, "--config", str(cfg))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "node.state_dir: no state database" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "typo").exists()


def test_status_of_a_postgresql_node_never_shows_the_password(tmp_path: Path, pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    from node.store import Store

    Store(pg_url).close()
    url = make_url(pg_url)
    pwfile = tmp_path / "db-password"
    pwfile.write_text(f"{url.password}\n")
    cfg = tmp_path / "node.toml"
    bare = f"{url.drivername}://{url.username}@{url.host}:{url.port}/{url.database}"
    cfg.write_text(f'[storage]\ndatabase_url = "{bare}"\ndatabase_password_file = "{pwfile}"\n')
    res = i3node("status", "--config", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["database"] == bare and str(url.password) not in res.stdout + res.stderr
    cfg.write_text(f'[storage]\ndatabase_url = "{pg_url}"\n')  # a password inside the URL is hidden too
    res = i3node("status", "--config", str(cfg))
    assert res.returncode == 0 and str(url.password) not in res.stdout and "***" in res.stdout


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


@pytest.mark.slow
def test_evaluate_writes_its_report_on_phantoms_and_on_a_nifti_dataset(demo_models, tmp_path: Path) -> None:
    from models.phantoms import make_phantoms
    from models.training import write_raw_dataset

    models = ("--preseg-dir", str(demo_models.preseg_dir), "--refine-dir", str(demo_models.refine_dir))
    out = tmp_path / "eval"
    res = i3node("evaluate", "--cases", "2", "--selections", "i3deep,equidistant", "--planes", "1,4",
                 "--refiners", "model+rw,paste,random_walker", "--configured-only", "random_walker",
                 "--out", str(out), *models)
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "evaluation.json").read_text())
    # 2 cases x (preseg + 2 selections x 2 planes x 2 refiners + random_walker at i3deep:4 only) x 2 classes
    assert len(doc["rows"]) == 2 * (1 + 2 * 2 * 2 + 1) * 2
    assert doc["meta"]["node_method"] == "model+rw" and doc["class_names"] == ["background", "organ", "lesion"]
    for name in ("evaluation.md", "dice_vs_planes.png", "before_after.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "| i3deep | 4 | **model+rw** |" in res.stdout
    assert "[evaluate" in res.stderr  # progress

    raw = tmp_path / "raw"
    cases = make_phantoms(2, seed=78, shape=(32, 64, 64))
    ds = write_raw_dataset(raw, 5, "Eval", [c.image for c in cases], [c.labels for c in cases],
                           [c.spacing for c in cases], {0: "CT"}, {"background": 0, "organ": 1, "lesion": 2})
    res = i3node("evaluate", "--data", str(ds), "--selections", "i3deep", "--planes", "2",
                 "--refiners", "paste", "--configured", "i3deep:2", "--configured-only", "paste",
                 "--missed", "lesion", "--cases", "5", "--out", str(tmp_path / "eval2"), *models)
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "eval2" / "evaluation.json").read_text())
    assert {r["case"] for r in doc["rows"]} == {"case_0000", "case_0001"}
    assert "removed (stress test)" in doc["meta"]["source"]
    # the ensemble's lesion was removed: pasting the planes leaves nothing off them
    assert all(r["dice_off_plane"] == 0.0 for r in doc["rows"] if r["refiner"] == "paste" and r["class"] == "lesion")


def test_evaluate_refuses_bad_arguments() -> None:
    for args, word in ((("--selections", "magic"), "choose from"), (("--configured", "i3deep"), "SELECTION:PLANES"),
                       (("--seed", "11"), "demo training seed"), (("--data", "/nonexistent"), "not a folder"),
                       (("--cases", "2"), "--preseg-dir: model folder /nonexistent does not exist")):
        res = i3node("evaluate", "--preseg-dir", "/nonexistent", *args)
        assert res.returncode == 2, (args, res.stderr)
        assert word in res.stderr, (args, res.stderr)
