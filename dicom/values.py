"""Encoding helpers for DICOM value representations shared by the object builders."""
from __future__ import annotations

__all__ = ["format_ds"]


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
