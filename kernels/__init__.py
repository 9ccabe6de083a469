"""Triton kernels of ncl_fast, installed as `ncl_fast.kernels`.

Triton code only: launchers and kernels, no autograd (that lives in `ncl_fast`).
"""
