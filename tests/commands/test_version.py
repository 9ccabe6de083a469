"""`--version`: every command prints the one version of the package
(`ncl_fast/_version.py`) and exits 0 before any work; the console scripts of
setup.py are exactly these commands."""
import importlib
import re

import pytest

import ncl_fast
from helpers import ROOT
from ncl_fast import _version

COMMANDS = ("train", "evaluate", "predict", "check_data", "synth", "ablate")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_prints_the_package_version(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"ncl_fast.{name}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr()
    assert out.out == f"ncl_fast {_version.__version__}\n" and out.err == ""
    assert list(tmp_path.iterdir()) == []  # nothing was done
    assert "--version" in module.build_parser().format_help()


def test_the_version_has_one_source():
    assert ncl_fast.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", _version.__version__)
    setup = (ROOT / "setup.py").read_text()
    assert _version.__version__ not in setup, "setup.py must read ncl_fast/_version.py, not repeat the version"
    assert 'version=_load("_version").__version__' in setup


def test_console_scripts_are_the_commands():
    setup = (ROOT / "setup.py").read_text()
    scripts = dict(re.findall(r'"(ncl-[a-z-]+)=(ncl_fast\.[a-z_.]+:main)"', setup))
    assert sorted(target.split(":")[0] for target in scripts.values()) == sorted(f"ncl_fast.{c}" for c in COMMANDS)
    for script, target in scripts.items():
        assert script == "ncl-" + target.split(":")[0].split(".")[-1].replace("_", "-")
