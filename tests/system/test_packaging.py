"""The sdist and the wheel, built as `python -m build` builds them (the wheel from
the sdist), from a copy of the source tree: the wheel holds every package and
module of the tree (`kernels/` as `ncl_fast.kernels`, nothing else at the top
level), the sdist everything the extension is compiled from, and both carry the
version of `ncl_fast/_version.py` and the licence.

The extension is left out here (`NCL_FAST_BUILD_EXT=0`: compiling it takes
minutes); `.ci/run` builds the wheel with it and runs every command from it.
"""
import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT
from ncl_fast import _ext_sources, _version

pytestmark = pytest.mark.slow

#: what is never part of a build's input
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 "*.so", "*.pyc", "runs", "output_dir", ".whl", ".gl")
COMMANDS = {"ncl-train": "train", "ncl-evaluate": "evaluate", "ncl-predict": "predict",
            "ncl-check-data": "check_data", "ncl-synth": "synth", "ncl-ablate": "ablate"}


def build(source: Path, out: Path, *what: str) -> None:
    env = dict(os.environ, NCL_FAST_BUILD_EXT="0")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), *what, str(source)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel built from the sdist, wheel built from the tree), from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORED)
    build(tree, tmp / "dist")  # the sdist, then a wheel built from it
    build(tree, tmp / "direct", "--wheel")
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    (wheel,) = (tmp / "dist").glob("*.whl")
    (direct,) = (tmp / "direct").glob("*.whl")
    return sdist, wheel, direct


def source_modules() -> set[str]:
    """Every .py file of `ncl_fast/` and `kernels/` (as `ncl_fast/kernels/`), as the wheel must hold it."""
    found = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ncl_fast").rglob("*.py")}
    found |= {"ncl_fast/kernels/" + p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.py")}
    return found


def wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_the_wheel_holds_every_package_of_the_tree(dists):
    _, wheel, direct = dists
    expected = source_modules()
    packages = {os.path.dirname(m) for m in expected}
    assert {"ncl_fast", "ncl_fast/data", "ncl_fast/model", "ncl_fast/reference", "ncl_fast/kernels"} <= packages
    for w in (wheel, direct):
        names = wheel_files(w)
        modules = {n for n in names if n.endswith(".py")}
        assert modules == expected, (f"{w.name}: missing {sorted(expected - modules)}, "
                                     f"unexpected {sorted(modules - expected)}")
        # one top-level package: `kernels` is installed under ncl_fast only
        assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"ncl_fast"}


def test_the_sdist_carries_what_the_extension_is_built_from(dists):
    sdist, _, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= names, sorted(csrc - names)
    cfg = _ext_sources
    assert set(cfg.CPU_SOURCES + cfg.CUDA_SOURCES) <= names
    # every header a source includes by quotes ("pc_bce.h", "../dispatch.h")
    for source in sorted(csrc):
        for header in re.findall(r'^\s*#include\s+"([^"]+)"', (ROOT / source).read_text(), re.M):
            local = os.path.normpath(os.path.join(os.path.dirname(source), header))
            assert local in names or f"csrc/{header}" in names, f"{source} includes {header}, not in the sdist"
    kernels = {"kernels/" + p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.py")}
    assert kernels <= names
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "ncl_fast/_ext_sources.py",
            "ncl_fast/_version.py"} <= names


def test_metadata_version_licence_and_commands(dists):
    sdist, wheel, direct = dists
    v = _version.__version__
    assert sdist.name == f"ncl_fast-{v}.tar.gz" and wheel.name.startswith(f"ncl_fast-{v}-")
    for w in (wheel, direct):
        with zipfile.ZipFile(w) as z:
            info = f"ncl_fast-{v}.dist-info"
            meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
            licence = z.read(f"{info}/licenses/LICENSE").decode()
            entry_points = z.read(f"{info}/entry_points.txt").decode()
        assert meta["Version"] == v
        assert "BSD-3-Clause" in (meta.get("License-Expression"), meta.get("License"))
        assert meta["License-File"] == "LICENSE"
        assert licence == (ROOT / "LICENSE").read_text() and "ncl_fast contributors" in licence
        scripts = dict(re.findall(r"^(ncl-[a-z-]+) = (\S+)$", entry_points, re.M))
        assert scripts == {script: f"ncl_fast.{module}:main" for script, module in COMMANDS.items()}
