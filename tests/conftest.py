import os
import random

import pytest
import torch

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
