"""The kernel variants that `bench/gpu_check.sh` times side by side name real settings:
a misspelt attribute would only show on a GPU, in the few minutes a run has there."""
import re
import shlex
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_every_variant_of_the_gpu_check_sets_attributes_that_exist():
    import bench_ncl_loss
    from ncl_fast.kernels import ncl_terms as k

    script = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    specs = [v for m in re.finditer(r"--variants\s+(\S+)", script) for v in shlex.split(m.group(1))[0].split(",")]
    assert any(len(s.split(":")) > 2 for s in specs), specs  # a variant of two settings is among them
    for spec in specs:
        _, impl, settings = bench_ncl_loss.parse_variant(spec)
        assert impl in ("triton", "reference"), spec
        for name, value in settings.items():
            assert hasattr(k, name), (spec, name)
            old = getattr(k, name)
            with bench_ncl_loss.kernel_settings({name: value}):
                new = getattr(k, name)
                assert type(new) is type(old) and (value == "" or str(new) == value), (spec, name, new)
            assert getattr(k, name) == old
