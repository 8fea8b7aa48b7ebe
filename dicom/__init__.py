"""DICOM in and out for i3node: receive, assemble, write and read SEG/KOS/MPR objects.

This package knows pydicom, pynetdicom and highdicom and imports nothing from
``node`` or ``models``.  Note that ``dicom`` is also the import name of the
long-dead pydicom 0.9; a test asserts that this package is the one imported.
"""
