"""Library logging: modules log through ``get_logger(__name__)``; the library never prints."""

from __future__ import annotations

import logging

__all__ = ["get_logger"]

_ROOT = "shiva_export"
logging.getLogger(_ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
