"""IMDL-BenCo's own code, to test ncl_fast against: installing it and importing it.

Both release lines install the same top-level package, `IMDLBenCo`, and pin
different albumentations (0.1.45: 1.3.0; imdlbenco13 0.2.9: >= 2), so each goes
into a folder of its own (`pip install --no-deps --target`), with the albumentations
stack its dataset code imports. Nothing is installed with its dependencies: no
second torch, numpy or scikit-learn. What both need beyond the venv (opencv-python-headless,
rich, ttach) is the `benco` extra of setup.py.

`python tests/system/benco_env.py` installs them into `$NCL_FAST_BENCO_DIR`
(default: `<venv>/benco`); `.ci/run` does. `load(version)` imports one of them.

Only the modules the tests use are imported: the package's `__init__` imports
its whole model zoo (timm, fvcore, ...), which these tests do not need, so
`IMDLBenCo` is made a bare package and its submodules load from the folder
(their own imports run unchanged).
"""
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

# name -> (IMDL-BenCo's wheel, what its imported modules need that neither the venv nor the extra has)
VERSIONS = {
    "imdlbenco": ("imdlbenco==0.1.45", ["albumentations==1.3.0", "qudida==0.0.4", "grad-cam==1.5.7"]),
    "imdlbenco13": ("imdlbenco13==0.2.9", ["albumentations==2.0.8", "albucore==0.0.24", "pydantic==2.14.4",
                                           "pydantic-core==2.50.5", "annotated-types==0.8.0",
                                           "typing-inspection==0.4.5", "stringzilla==5.3.2", "simsimd==6.5.16",
                                           "grad-cam==1.5.7"]),
}
MODULES = ("training_scripts.utils.misc", "evaluation", "datasets", "training_scripts.tester",
           "training_scripts.trainer")


def root() -> Path:
    return Path(os.environ.get("NCL_FAST_BENCO_DIR") or Path(sys.prefix) / "benco")


def install() -> None:
    for name, (wheel, deps) in VERSIONS.items():
        target = root() / name
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
                        str(target), wheel, *deps], check=True)
        print(f"{wheel} and {', '.join(deps)} in {target}")


def available() -> list[str]:
    return [name for name in VERSIONS if (root() / name / "IMDLBenCo").is_dir()]


def load(name: str) -> dict[str, types.ModuleType]:
    """Import IMDL-BenCo `name` (a key of VERSIONS): {submodule: module}. The other
    version's modules, and its albumentations, are taken out of sys.modules first."""
    folder = root() / name
    if not (folder / "IMDLBenCo").is_dir():
        raise FileNotFoundError(f"{VERSIONS[name][0]} is not installed in {folder}: run "
                                f"`python tests/system/benco_env.py`")
    stale = ("IMDLBenCo", "albumentations", "albucore", "qudida", "pydantic", "pydantic_core", "pytorch_grad_cam")
    for key in [k for k in sys.modules if k.split(".")[0] in stale]:
        del sys.modules[key]
    sys.path[:] = [p for p in sys.path if not p.startswith(str(root()))]
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    package = types.ModuleType("IMDLBenCo")
    package.__path__ = [str(folder / "IMDLBenCo")]
    sys.modules["IMDLBenCo"] = package
    return {m: importlib.import_module("IMDLBenCo." + m) for m in MODULES}


if __name__ == "__main__":
    install()
