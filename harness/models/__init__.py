"""Encoders, fusion heads and the model kinds (``model.kind``) built from them."""

from . import mmtm as _mmtm  # noqa: F401  (registers model.kind=mmtm)
