"""Encoding helpers for DICOM value representations shared by the object builders."""
from __future__ import annotations

import re

from pydicom.dataset import Dataset

__all__ = ["format_ds", "pad_even", "quiet_pydicom", "sanitize_header"]

#: Value representations whose values the node's outputs copy from the source and that the
#: object builders (highdicom, pydicom's writer) validate.
_CHECKED_VRS = frozenset({"DA", "TM", "DT", "AS", "CS", "SH", "LO", "PN", "AE"})
_ISO_DATE = re.compile(r"^\s*(\d{4})[-./](\d{2})[-./](\d{2})\s*$")


def pad_even(text: str, pad: bytes) -> bytes:
    """ASCII bytes of `text` padded with `pad` to an even length (UI pads NUL, AE/SH pad space)."""
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def format_ds(value: float) -> str:
    """Format a float as a Decimal String (DS): at most 16 characters, no needless digits.

    Magnitudes below 1e-9 (e.g. rounding noise in direction cosines) are written as "0".

    Raises
    ------
    ValueError
        If the value cannot be written in 16 characters.
    """
    v = float(value)
    if v == 0 or abs(v) < 1e-9:
        return "0"
    for digits in range(16, 0, -1):
        text = f"{v:.{digits}g}"
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot format {value!r} as DS")


def sanitize_header(ds: Dataset) -> list[str]:
    """Make a source header safe to copy into the node's outputs; return the keywords changed.

    Patient and study attributes are copied into every SEG, KOS and MPR image, and the
    builders validate them: one invalid value (a birth date written ``1923-08-17``) would stop
    the job, and pydicom's and highdicom's messages would carry the value into logs. Top-level
    elements of the checked value representations are validated; an ISO-like date is
    rewritten as ``YYYYMMDD``, anything else invalid becomes empty (every such attribute of
    the copied modules is type 2 or 3). Only keywords are returned, never values.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A source header (modified in place).

    Returns
    -------
    list of str
        Keywords (or tags) of the elements that were rewritten or emptied.
    """
    from pydicom import config
    from pydicom.valuerep import validate_value

    changed: list[str] = []
    for elem in list(ds):
        if elem.VR not in _CHECKED_VRS or elem.value is None or elem.tag.group in (0x0002,) or elem.tag.is_private:
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        try:
            for value in values:
                validate_value(elem.VR, "" if value is None else str(value), config.RAISE)
            continue
        except (ValueError, TypeError):
            pass
        name = elem.keyword or str(elem.tag)
        if elem.VR == "DA" and elem.VM == 1:
            m = _ISO_DATE.match(str(elem.value))
            if m:
                elem.value = "".join(m.groups())
                changed.append(name)
                continue
        elem.value = ""
        changed.append(name)
    return changed


def quiet_pydicom() -> None:
    """Stop pydicom from warning about (and logging) invalid values it reads.

    pydicom's default reading validation logs every invalid value it meets, value included
    (``Invalid value for VR DA: '1923-08-17'``): patient attributes would reach the node's
    logs. The node validates what it copies itself (:func:`sanitize_header`).
    """
    import logging

    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    logger = logging.getLogger("pydicom")
    if logger.getEffectiveLevel() < logging.ERROR:
        logger.setLevel(logging.ERROR)
