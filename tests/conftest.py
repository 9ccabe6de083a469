"""Fixtures and hooks only: what tests import lives in helpers.py."""
import os
import random

import pytest
import torch

# Without a GPU, Triton's interpreter runs the kernels on CPU tensors (it must be
# on before the first import of Triton, which `import torch` does not do).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small CPU machines (CI has 2 cores): avoid oversubscription.
torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture
def gen(request):
    """A torch.Generator with a fresh seed every run; NCL_TEST_SEED=<n> replays one.

    The seed is printed, so a failing test's captured output says how to replay it.
    """
    seed = int(os.environ.get("NCL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"[{request.node.name}] NCL_TEST_SEED={seed}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return g


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with the reason, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
