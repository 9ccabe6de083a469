// Dtype dispatch for the PC-loss kernels: logits in fp32/fp16/bf16/fp64, masks
// in bool/uint8/fp32/fp16/bf16. Narrower than AT_DISPATCH_ALL_TYPES on purpose:
// every (logits, mask) pair is a kernel instantiation, and compile time matters.
#pragma once

#include <ATen/Dispatch.h>

#define NCL_FAST_DISPATCH_MASK(TYPE, NAME, ...)                                                 \
  [&] {                                                                                       \
    switch (TYPE) {                                                                           \
      case at::kBool: { using mask_t = bool; return __VA_ARGS__(); }                          \
      case at::kByte: { using mask_t = uint8_t; return __VA_ARGS__(); }                       \
      case at::kFloat: { using mask_t = float; return __VA_ARGS__(); }                        \
      case at::kHalf: { using mask_t = at::Half; return __VA_ARGS__(); }                      \
      case at::kBFloat16: { using mask_t = at::BFloat16; return __VA_ARGS__(); }              \
      default:                                                                                \
        TORCH_CHECK_VALUE(false, NAME, ": the mask must be bool, uint8, float32, float16 or " \
                          "bfloat16, got ", TYPE, "; convert it with mask.float()");          \
    }                                                                                         \
  }()

#define NCL_FAST_DISPATCH_LOGITS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
