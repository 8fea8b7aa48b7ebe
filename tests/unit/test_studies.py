"""Series selection rules (pure) and the dependency direction of the packages."""
from __future__ import annotations

import ast
from pathlib import Path

import dicom
from node.app import allowed_callers_map
from node.settings import SelectionRule
from node.studies import select_series, series_matches

REPO = Path(__file__).resolve().parents[2]
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def _row(uid: str, modality: str = "CT", n: int = 40, desc: str = "", jobbed: int = 0, sop: str = CT) -> dict:
    return {"series_uid": uid, "modality": modality, "n_instances": n, "description": desc,
            "jobbed_instances": jobbed, "sop_class_uid": sop}


def test_dicom_package_is_this_repository_not_pydicom_0_9() -> None:
    assert Path(dicom.__file__).resolve().is_relative_to(REPO)


def test_rule_matching() -> None:
    rule = SelectionRule(modalities=("CT",), min_slices=20, description_pattern="abd")
    assert series_matches(rule, modality="CT", n_instances=20, description="CT ABDOMEN")
    assert not series_matches(rule, modality="MR", n_instances=50, description="abdomen")
    assert not series_matches(rule, modality="CT", n_instances=19, description="abdomen")
    assert not series_matches(rule, modality="CT", n_instances=50, description="thorax")


def test_select_series_skips_non_images_small_and_already_jobbed() -> None:
    rules = (SelectionRule(modalities=("CT",), min_slices=10),)
    rows = [
        _row("1.1"),
        _row("1.2", n=5),
        _row("1.3", sop=SEG, modality="SEG"),
        _row("1.4", jobbed=40),
        _row("1.5", n=41, jobbed=40),  # completed by late instances: new job
        _row("1.6", modality="MR"),
    ]
    assert select_series(rules, rows) == [("1.1", 40), ("1.5", 41)]


def test_any_rule_is_enough() -> None:
    rules = (SelectionRule(modalities=("CT",), min_slices=100), SelectionRule(modalities=("MR",), min_slices=1))
    assert [u for u, _ in select_series(rules, [_row("1.1"), _row("1.2", modality="MR")])] == ["1.2"]


def test_allowed_callers_map() -> None:
    assert allowed_callers_map(("*",)) is None
    m = allowed_callers_map(("PACS@10.0.0.5", "PACS@10.0.0.6", "VIEWER", "*@127.0.0.1"))
    assert m == {"PACS": frozenset({"10.0.0.5", "10.0.0.6"}), "VIEWER": frozenset(), "*": frozenset({"127.0.0.1"})}


def _imports(pkg: str) -> set[str]:
    found: set[str] = set()
    for f in (REPO / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_dependency_direction() -> None:
    assert not _imports("dicom") & {"node", "models"}, "dicom/ must not import node/ or models/"
    assert not _imports("models") & {"node", "dicom"}, "models/ must not import node/ or dicom/"
