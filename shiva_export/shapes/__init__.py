"""Procedural coloured-shape scenes: the training data and the analytic judge of the ``sd35-shapes`` model.

:mod:`~shiva_export.shapes.data` renders one shape (kind, colour, size, position) on a plain background
with its caption and ground-truth foreground mask, deterministically from a seed.
:mod:`~shiva_export.shapes.analyze` reads those attributes back from any image (generated or real) by
simple image analysis and describes it by 19 analytic features; :mod:`~shiva_export.shapes.metrics` judges
image sets (per-image records), computes the Fréchet distance on standardised features and the bootstrap
intervals of ``validate quality``.
"""
