"""One tolerance table per input dtype (values vs. the float64 oracles).

Inputs in bf16/fp16 are upcast on load and all accumulation is fp32, so against
an oracle fed the *same rounded values* every input dtype meets the fp32 bound;
the bf16/fp16 rows are the bounds against the oracle fed the unrounded fp32
values (the rounding of the input itself, 2^-8 relative for bf16).
"""
import torch

# dtype: (rtol, atol)
SAME_VALUES = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 1e-6),
    torch.float16: (1e-5, 1e-6),
}
VS_FP32_INPUT = {
    torch.bfloat16: (3e-2, 1e-3),
    torch.float16: (4e-3, 1e-4),
}

# Gradients of a fused backend against the reference's (itself checked by
# gradcheck): (rtol, atol as a fraction of the largest reference gradient).
# Half-precision gradients are fp32 values rounded to the input dtype, where one
# unit in the last place may differ.
GRADS = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
