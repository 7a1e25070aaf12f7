"""Nothing unsafe is loaded: no pickle anywhere, every torch.load is weights_only, a hostile checkpoint is refused."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from shiva_export.errors import ConfigError

PKG = Path(__file__).resolve().parents[1] / "shiva_export"


def _sources():
    return sorted(PKG.rglob("*.py"))


def _call_args(text: str, start: int) -> str:
    """The argument text of a call whose '(' ends at ``start`` (balanced parentheses)."""
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1]


def test_no_pickle_and_every_torch_load_is_weights_only():
    offenders = []
    for p in _sources():
        text = p.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            offenders.append(f"{p}: imports a pickle module")
        for m in re.finditer(r"torch\.load\(", text):
            args = _call_args(text, m.end())
            if "weights_only=True" not in args:
                offenders.append(f"{p}: torch.load without weights_only=True: torch.load({args})")
        if re.search(r"\bnp\.load\([^)]*allow_pickle\s*=\s*True", text):
            offenders.append(f"{p}: np.load with allow_pickle=True")
    assert not offenders, "\n".join(offenders)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch " + str(_Boom.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from shiva_export.train.checkpoint import load_checkpoint

    _Boom.marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "shiva-train/1", "evil": _Boom()}, path)
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not _Boom.marker.exists()
    path.write_bytes(pickle.dumps({"format": "x", "evil": _Boom()}))
    with pytest.raises(ConfigError):
        load_checkpoint(path)
    assert not _Boom.marker.exists()
