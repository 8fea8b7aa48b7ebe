"""Settings: TOML -> frozen dataclasses, with errors that name the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node.settings import (
    Settings,
    SettingsError,
    default_settings,
    iter_keys,
    load_settings,
    render_example_toml,
    settings_from_mapping,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_run_on_loopback_with_state_under_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = default_settings()
    assert s.dicom.host == "127.0.0.1"
    assert s.dicom.ae_title == "I3NODE" and s.dicom.port == 11112
    assert s.state_dir == tmp_path / "var"
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'i3node.db'}"
    assert s.spool_dir == tmp_path / "var" / "spool"
    assert s.study.stable_after_s == 30.0


def test_settings_are_frozen() -> None:
    s = default_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dicom.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"dicom": {"port": "11112"}}, "dicom.port: expected an integer"),
        ({"dicom": {"port": 70000}}, "dicom.port: 70000 is above the maximum 65535"),
        ({"dicom": {"prot": 1}}, "dicom.prot: unknown key; allowed keys here: acse_timeout_s"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"dicom": {"ae_title": "A" * 17}}, "dicom.ae_title: 'AAAAAAAAAAAAAAAAA' is not valid; expected 1-16"),
        ({"acquisition": {"strategy": "random"}}, "acquisition.strategy: 'random' is not allowed; choose one of 'i3deep', 'uss'"),
        ({"acquisition": {"min_uncert": 1.5}}, "acquisition.min_uncert: 1.5 is above the maximum 1"),
        ({"acquisition": {"axes": ["axial", "oblique"]}}, "acquisition.axes[1]: 'oblique' is not allowed"),
        ({"study": {"stable_after_s": True}}, "study.stable_after_s: expected a number"),
        ({"selection": [{"modalities": ["US"]}]}, "selection[0].modalities[0]: 'US' is not supported"),
        ({"selection": [{"description_pattern": "("}]}, "selection[0].description_pattern: not a valid regular expression"),
        ({"selection": {"min_slices": 3}}, "selection: expected a list"),
        ({"destinations": [{"ae_title": "PACS", "portt": 104}]}, "destinations[0].portt: unknown key"),
        ({"dicom": {"allowed_callers": ["PACS@"]}}, "dicom.allowed_callers[0]: 'PACS@' is not valid"),
        ({"dicom": {"tls": True}}, "tls.certificate: required because TLS is enabled"),
        ({"models": {"device": "gpu"}}, "models.device: 'gpu' is not valid; expected auto, cpu, cuda or cuda:N"),
        ({"outputs": {"uid_root": "1.2.abc"}}, "outputs.uid_root: '1.2.abc' is not valid"),
        ({"delivery": {"backoff_initial_s": 10.0, "backoff_max_s": 5.0}}, "delivery.backoff_max_s: must be at least"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(doc: dict, message: str) -> None:
    with pytest.raises(SettingsError) as exc:
        settings_from_mapping(doc)
    assert message in str(exc.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="settings file not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom\nport = 1\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(bad)


def test_full_file_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(
        """
[dicom]
ae_title = "AI_NODE"
port = 4242
allowed_callers = ["PACS@10.0.0.5", "VIEWER"]

[[selection]]
modalities = ["CT"]
min_slices = 40
description_pattern = "abdomen"

[[destinations]]
ae_title = "PACS"
host = "pacs.example.org"
port = 104
"""
    )
    s = load_settings(f)
    assert isinstance(s, Settings)
    assert s.dicom.port == 4242 and s.dicom.allowed_callers == ("PACS@10.0.0.5", "VIEWER")
    assert s.selection[0].min_slices == 40 and s.selection[0].modalities == ("CT",)
    assert s.destinations[0].host == "pacs.example.org" and s.destinations[0].port == 104


def test_example_file_is_generated_from_the_dataclasses_and_loads() -> None:
    example = REPO / "config" / "i3node.example.toml"
    assert example.read_text() == render_example_toml(), "regenerate config/i3node.example.toml"
    s = load_settings(example)
    assert s.dicom == default_settings().dicom
    text = example.read_text()
    for key, _type, _default, doc in iter_keys():
        assert key.split(".")[-1] in text, key
        assert doc, f"{key} has no documentation"
