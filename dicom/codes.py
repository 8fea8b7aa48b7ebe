"""Coded concepts for the segments the node writes and reads.

A :class:`SegmentSpec` ties one label value of the node's label maps (``1`` organ,
``2`` lesion, ...) to the DICOM codes that describe it in a Segmentation
(Segmented Property Category / Type, CID 7150 / 7151) and to a display colour.
The defaults mirror ``config/segments.toml``; the node may pass its own table
(parsed TOML) to :func:`segment_specs_from_mapping`.

Codes are real SNOMED CT (``SCT``) and DICOM (``DCM``) concepts.
"""
from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.sr.coding import Code

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "LESION",
    "LIVER",
    "MORPHOLOGICALLY_ALTERED_STRUCTURE",
    "OF_INTEREST",
    "REVIEW_REGION_CATEGORY",
    "REVIEW_REGION_TYPE",
    "SegmentSpec",
    "code_from_mapping",
    "default_segment_specs",
    "load_segment_specs",
    "segment_specs_from_mapping",
]

#: SCT 123037004 "Anatomical Structure" (CID 7150 category).
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
#: SCT 49755003 "Morphologically Altered Structure" (CID 7150 category).
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")
#: SCT 10200004 "Liver" (CID 7151 / CID 4 type and region).
LIVER = Code("10200004", "SCT", "Liver")
#: SCT 52988006 "Lesion" (CID 7151 type).
LESION = Code("52988006", "SCT", "Lesion")
#: DCM 113000 "Of Interest" (CID 7010 key object selection document title).
OF_INTEREST = Code("113000", "DCM", "Of Interest")
# Review regions (AI advice, papers/003) are places to look at, not structures: neither
# "Anatomical Structure" nor "Morphologically Altered Structure" (the lesion class's category)
# would be honest, and a class code would let a returning SEG map them onto a class.
# CID 7150 offers SCT 309825002 "Spatial and Relational Concept" for locations; pydicom's code
# dictionary has no DCM or SCT "region of interest" concept, its nearest is NCIt C85402
# "Imaging Region of Interest" (CID 272), used as the type (CID 7151 is extensible).
#: SCT 309825002 "Spatial and Relational Concept" (CID 7150 category of review regions).
REVIEW_REGION_CATEGORY = Code("309825002", "SCT", "Spatial and Relational Concept")
#: NCIt C85402 "Imaging Region of Interest" (type of review regions).
REVIEW_REGION_TYPE = Code("C85402", "NCIt", "Imaging Region of Interest")

_MAX_LABEL_VALUE = 255


@dataclass(frozen=True)
class SegmentSpec:
    """One foreground class of the node's label maps and its DICOM description.

    Parameters
    ----------
    label_value : int
        Value of the class in the node's ``uint8`` label maps (1..255).
    label : str
        Segment Label written to, and matched in, Segmentations (e.g. ``"organ"``).
    category : pydicom.sr.coding.Code
        Segmented Property Category (CID 7150).
    property_type : pydicom.sr.coding.Code
        Segmented Property Type (CID 7151).
    color_rgb : tuple[int, int, int]
        Recommended display colour, 8-bit sRGB.
    anatomic_region : pydicom.sr.coding.Code or None
        Optional Anatomic Region (CID 4) the segment lies in.
    """

    label_value: int
    label: str
    category: Code
    property_type: Code
    color_rgb: tuple[int, int, int] = (128, 174, 128)
    anatomic_region: Code | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label_value, int) or not 1 <= self.label_value <= _MAX_LABEL_VALUE:
            raise ValueError(
                f"label_value must be an integer in 1..{_MAX_LABEL_VALUE}, got {self.label_value!r}"
            )
        if not isinstance(self.label, str) or not self.label.strip() or len(self.label) > 64:
            raise ValueError(f"label must be a non-empty string of at most 64 characters, got {self.label!r}")
        for name in ("category", "property_type"):
            if not isinstance(getattr(self, name), Code):
                raise TypeError(f"{name} must be a pydicom.sr.coding.Code, got {type(getattr(self, name)).__name__}")
        if self.anatomic_region is not None and not isinstance(self.anatomic_region, Code):
            raise TypeError("anatomic_region must be a pydicom.sr.coding.Code or None")
        rgb = tuple(self.color_rgb)
        if len(rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb):
            raise ValueError(f"color_rgb must be three integers in 0..255, got {self.color_rgb!r}")
        object.__setattr__(self, "color_rgb", rgb)


def default_segment_specs() -> tuple[SegmentSpec, ...]:
    """Return the segments of the demo classes (same content as ``config/segments.toml``).

    Returns
    -------
    tuple[SegmentSpec, ...]
        ``organ`` (label 1, Anatomical Structure / Liver) and ``lesion``
        (label 2, Morphologically Altered Structure / Lesion, in the liver).
    """
    return (
        SegmentSpec(1, "organ", ANATOMICAL_STRUCTURE, LIVER, (221, 130, 101)),
        SegmentSpec(2, "lesion", MORPHOLOGICALLY_ALTERED_STRUCTURE, LESION, (255, 255, 0), anatomic_region=LIVER),
    )


def code_from_mapping(data: Mapping[str, Any], *, name: str = "code") -> Code:
    """Build a :class:`~pydicom.sr.coding.Code` from ``{code, scheme, meaning}``.

    Parameters
    ----------
    data : Mapping[str, Any]
        Table with string keys ``code`` (or ``value``), ``scheme`` (or
        ``scheme_designator``) and ``meaning``.
    name : str
        Name of the table, used in error messages.

    Returns
    -------
    pydicom.sr.coding.Code
        The code.

    Raises
    ------
    ValueError
        If a key is missing or empty.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} must be a table with keys code, scheme, meaning; got {type(data).__name__}")
    value = data.get("code", data.get("value"))
    scheme = data.get("scheme", data.get("scheme_designator"))
    meaning = data.get("meaning")
    for key, item in (("code", value), ("scheme", scheme), ("meaning", meaning)):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{name}.{key} must be a non-empty string, got {item!r}")
    return Code(str(value), str(scheme), str(meaning))


def segment_specs_from_mapping(data: Mapping[str, Any]) -> tuple[SegmentSpec, ...]:
    """Build segment specs from a parsed TOML document or table.

    Parameters
    ----------
    data : Mapping[str, Any]
        Either a document with a ``segments`` array of tables or that array's
        parent table itself. Each table has ``label_value`` (int), ``label``
        (str), ``category`` and ``type`` (tables of ``code``/``scheme``/
        ``meaning``), optional ``color`` (three ints) and optional
        ``anatomic_region`` (code table).

    Returns
    -------
    tuple[SegmentSpec, ...]
        Specs sorted by label value.

    Raises
    ------
    ValueError
        If an entry is malformed (the message names ``segments[i].key``), or if
        label values or labels repeat.
    """
    if not isinstance(data, Mapping) or "segments" not in data:
        raise ValueError("segments: expected a table with a 'segments' array of tables")
    entries = data["segments"]
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
        raise ValueError("segments must be a non-empty array of tables")
    specs: list[SegmentSpec] = []
    allowed = {"label_value", "label", "category", "type", "color", "anatomic_region"}
    for i, entry in enumerate(entries):
        where = f"segments[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table")
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        for key in ("label_value", "label", "category", "type"):
            if key not in entry:
                raise ValueError(f"{where}.{key} is required")
        region = entry.get("anatomic_region")
        color = entry.get("color", (128, 174, 128))
        if not isinstance(color, Sequence) or isinstance(color, str):
            raise ValueError(f"{where}.color must be an array of three integers 0..255")
        try:
            specs.append(
                SegmentSpec(
                    label_value=entry["label_value"],
                    label=entry["label"],
                    category=code_from_mapping(entry["category"], name=f"{where}.category"),
                    property_type=code_from_mapping(entry["type"], name=f"{where}.type"),
                    color_rgb=tuple(color),  # type: ignore[arg-type]
                    anatomic_region=(
                        None if region is None else code_from_mapping(region, name=f"{where}.anatomic_region")
                    ),
                )
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    values = [s.label_value for s in specs]
    if len(set(values)) != len(values):
        raise ValueError(f"segments: label_value must be unique, got {values}")
    labels = [s.label.casefold() for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError("segments: label must be unique (case-insensitive)")
    return tuple(sorted(specs, key=lambda s: s.label_value))


def load_segment_specs(path: str | Path) -> tuple[SegmentSpec, ...]:
    """Read segment specs from a TOML file (see ``config/segments.toml``).

    Parameters
    ----------
    path : str or pathlib.Path
        TOML file with a ``[[segments]]`` array of tables.

    Returns
    -------
    tuple[SegmentSpec, ...]
        Specs sorted by label value.
    """
    with open(path, "rb") as fh:
        return segment_specs_from_mapping(tomllib.load(fh))
