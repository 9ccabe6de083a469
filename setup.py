"""Build and install ncl_fast.

The Triton code in `kernels/` installs as `ncl_fast.kernels` (a top-level
`kernels` module would collide with other packages).
"""
from setuptools import setup

setup(
    name="ncl_fast",
    version="0.1.0",
    description="NCL image-manipulation localization (ICCV 2023) trained from scratch, with fused Triton/CUDA losses",
    python_requires=">=3.10",
    packages=["ncl_fast", "ncl_fast.reference", "ncl_fast.model", "ncl_fast.kernels"],
    package_dir={"ncl_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest>=7"],
    },
)
