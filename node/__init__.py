"""The i3node service: settings, state store, spool, scheduler, pipeline, exporter, CLI.

``node.app`` is the one composition root that wires ``dicom`` and ``models`` together.
"""

__version__ = "0.1.0"
