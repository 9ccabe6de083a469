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


def require_backend(backend: str, op: str) -> None:
    """Skip (or fail, where NCL_FAST_REQUIRE=<backend,...> says it must be there, as in CI)
    when `backend` cannot run `op` on CPU tensors here."""
    from ncl_fast import _backend

    reason = _backend.unavailable_reason(backend, op, torch.device("cpu"))
    if reason is None:
        return
    required = os.environ.get("NCL_FAST_REQUIRE", "").split(",")
    if backend in required:
        pytest.fail(f"NCL_FAST_REQUIRE lists {backend}, but it cannot run {op}: {reason}")
    pytest.skip(f"{backend} backend unavailable: {reason}")
