"""Package-level checks: public names, registration on import, the `info` subcommand."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import timm

import defocus_clip
from defocus_clip import cli
from defocus_clip.layers.scan import resolve_scan_impl


def test_public_names():
    for name in ("DefocusError", "ConfigError", "DataError", "InputShapeError", "DefocusMamba", "create_tower",
                 "list_towers", "list_clip_models", "load_official_defocus_mamba", "__version__"):
        assert hasattr(defocus_clip, name), name
    assert issubclass(defocus_clip.InputShapeError, defocus_clip.DefocusError)


def test_towers_are_registered_with_timm():
    towers = defocus_clip.list_towers()
    for name in ("defocus_mamba_base_patch32_224", "defocus_mamba_base_patch16_224", "defocus_mamba_small_patch16_224",
                 "defocus_mamba_large_patch16_224", "causal_mamba_base_patch32_224", "defocus_mamba_tiny_patch8_64"):
        assert name in towers
        assert name in timm.list_models(name)


def test_info_prints_names_and_scan_impl(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in defocus_clip.list_clip_models() + defocus_clip.list_towers():
        assert name in out
    assert f"scan implementation: cpu={resolve_scan_impl('cpu')}" in out
    assert "DEFOCUS_SCAN_IMPL" in out


def test_info_json(capsys):
    import json

    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scan_impl"]["cpu"] == resolve_scan_impl("cpu")
    assert info["timm_towers"] == defocus_clip.list_towers()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_checks_free_disk_first(tmp_path):
    """`make install` stops before writing anything, saying what it needs, when the venv's disk is too small."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "not" / "yet" / ".venv"  # no torch there; its nearest existing folder is tmp_path

    def check(gb: int) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", "-C", str(root), "check-disk", f"VENV={venv}", f"INSTALL_GB={gb}"],
                              capture_output=True, text=True, timeout=60)

    assert check(0).returncode == 0
    short = check(10**9)
    assert short.returncode != 0
    assert f"{venv} needs about {10**9} GB of free disk" in short.stderr
    assert f"the disk that holds {tmp_path} has" in short.stderr
    assert not venv.parent.exists()
