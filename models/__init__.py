"""The i3Deep method, numpy in / numpy out.

Uncertainty, slice acquisition, refinement input encoding, the nnU-Net ensemble wrapper,
training helpers, baselines, metrics and synthetic phantoms.  torch and nnunetv2 are
imported only by the modules that wrap nnU-Net.  Imports nothing from ``node`` or ``dicom``.
"""
