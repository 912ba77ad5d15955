from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main


def test_data_list_json(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list", "--json", "--data-root", str(data_root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["breast", "pneumonia", "retina", "pathology", "adrenal", "vessel",
                         "ct-region", "mr-xr"]
    assert (out["breast"]["train"], out["breast"]["val"], out["breast"]["test"]) == (546, 78, 156)
    assert out["vessel"]["test"] == 382 and out["retina"]["task"] == "ordinal"
    assert out["ct-region"]["train"] + out["ct-region"]["val"] + out["ct-region"]["test"] == 15000


def test_data_list_table_and_missing_root(data_root: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "pneumonia" in out and "4708" in out and "29477" in out
    assert main(["data", "list", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "breastmnist.npz is missing" in out
