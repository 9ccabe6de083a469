"""Build and install ncl_fast.

* The Triton code in `kernels/` installs as `ncl_fast.kernels` (a top-level
  `kernels` module would collide with other packages).
* The C++/CUDA extension `ncl_fast._C` (sources in `csrc/`) is built with ninja:
  a CUDA extension where torch is a CUDA build and nvcc is found, for the
  architectures in `TORCH_CUDA_ARCH_LIST` (default sm_80 and sm_90), a CPU-only
  one otherwise (or with `NCL_FAST_FORCE_CPU=1`). `NCL_FAST_BUILD_EXT=0` skips
  it; it is then compiled on first use (`ncl_fast._cuda_ops`).

torchvision supplies the ViT backbone's transformer (`ncl_fast.model.vit`): a
well-kept, widely tested implementation rather than a hand-written one, with
random initialisation (nothing is downloaded).

* Packages are found, not listed: every folder of `ncl_fast/` with an
  `__init__.py`, and `kernels/` with its subpackages under `ncl_fast.kernels`.
* The version has one source, `ncl_fast/_version.py`, read here without
  importing the package (which would import torch).
* The sdist (`MANIFEST.in`) carries `csrc/` with its headers, so a wheel built
  from it compiles the same extension.

torch must already be installed: `pip install --no-build-isolation -e .`.
"""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    """Load ncl_fast/<name>.py alone (importing the package would import all of it, torch included)."""
    spec = importlib.util.spec_from_file_location(f"_ncl_fast_setup_{name}", os.path.join(HERE, "ncl_fast", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    README = f.read()

#: `ncl_fast` and its subpackages, then the Triton code of `kernels/` as `ncl_fast.kernels`
PACKAGES = find_packages(include=["ncl_fast", "ncl_fast.*"]) + [
    "ncl_fast.kernels", *(f"ncl_fast.kernels.{name}" for name in find_packages("kernels"))]


ext_modules, cmdclass = [], {}
if os.environ.get("NCL_FAST_BUILD_EXT", "1") != "0":
    from torch.utils import cpp_extension

    cfg = _load("_ext_sources").extension_config(cpp_extension.CUDA_HOME)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    Ext = cpp_extension.CUDAExtension if cfg["with_cuda"] else cpp_extension.CppExtension
    print(
        f"ncl_fast: building ncl_fast._C ({'CUDA ' + os.environ['TORCH_CUDA_ARCH_LIST'] if cfg['with_cuda'] else 'CPU only'}: "
        f"{cfg['why']})",
        flush=True,
    )
    ext_modules = [
        Ext(
            "ncl_fast._C",
            sources=cfg["sources"],
            define_macros=cfg["define_macros"],
            extra_compile_args={"cxx": cfg["cxx_flags"], "nvcc": cfg["nvcc_flags"]},
        )
    ]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

setup(
    name="ncl_fast",
    version=_load("_version").__version__,
    description="NCL image-manipulation localization (ICCV 2023) trained from scratch, with fused Triton/CUDA losses",
    long_description=README,
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"ncl_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",  # the ViT backbone's blocks; 0.19 pairs with torch 2.4
        "numpy",
        "ninja",
        "pybind11",
        "pillow",
        "scipy",
        "scikit-image",
        "tqdm",
        "tensorboard",
        "nvidia-ml-py",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-learn", "build"],  # build: the packaging test builds the sdist and wheel
        # `--protocol benco|benco13` resizes as IMDL-BenCo does, with cv2; the tests against IMDL-BenCo's own
        # code (tests/system/benco_env.py installs it, without dependencies) also import rich and ttach
        "benco": ["opencv-python-headless", "rich", "ttach"],
    },
    entry_points={
        "console_scripts": [
            "ncl-train=ncl_fast.train:main",
            "ncl-evaluate=ncl_fast.evaluate:main",
            "ncl-predict=ncl_fast.predict:main",
            "ncl-check-data=ncl_fast.check_data:main",
            "ncl-synth=ncl_fast.synth:main",
            "ncl-ablate=ncl_fast.ablate:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
