from shiva_export.cli import _entry

_entry()
