// The binarized full-resolution mask of the PC loss, one bit a pixel, and the
// shrunk ground truth of any scale counted from it. Shared by the CPU and CUDA
// kernels (host and device functions alike), so that the CPU op, which the
// tests hold to the float64 oracles of SPEC.md, runs the very code that the
// CUDA kernels run to find every cell's g.
//
// Layout: the bit of pixel (b, y, x) is bit (x & 31) of word
// bits[(b * H + y) * row_words + (x >> 5)], row_words = ceil(W / 32); it is
// 1[float(M[b, 0, y, x]) > 0.5]. The bits of a row past W are 0 (never read).
//
// Both kernels of a pass build these bits once from the mask (one read of every
// mask element, for all scales) and then count a cell's s_y x s_x window of any
// scale with popcounts: the mask itself is read once per pass, not once per scale.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NCL_FAST_HD __host__ __device__ __forceinline__
#else
#define NCL_FAST_HD inline
#endif

namespace ncl_fast {

NCL_FAST_HD int64_t bit_row_words(int64_t width) { return (width + 31) / 32; }

NCL_FAST_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  return static_cast<int>((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
#endif
}

// The set bits of pixels [x0, x0 + n) of one row of words (n >= 0).
NCL_FAST_HD int64_t count_bits(const uint32_t* row, int64_t x0, int64_t n) {
  int64_t count = 0;
  while (n > 0) {
    const int off = static_cast<int>(x0 & 31);
    const int take = n < 32 - off ? static_cast<int>(n) : 32 - off;  // bits [off, off + take) of this word
    const uint32_t keep = take == 32 ? 0xFFFFFFFFu : (1u << take) - 1u;
    count += popcount32((row[x0 >> 5] >> off) & keep);
    x0 += take;
    n -= take;
  }
  return count;
}

// The bits kernel's map of work (csrc/cuda): warp w of its grid makes the words
// [word0, word0 + n_words) of one mask row (row = b * H + y), at most 32 words;
// for the j-th of them, lane l reads pixel run_pixel(run, j, l) (none past W:
// a 0 bit), and the ballot of the 32 lanes is the word. The C++ kernel walks
// the same map lane by lane, so the CPU tests check its index math.
struct BitsRun {
  int64_t row, word0;
  int n_words;
};

NCL_FAST_HD int64_t bits_runs(int64_t rows, int64_t row_words) { return rows * ((row_words + 31) / 32); }

NCL_FAST_HD BitsRun bits_run(int64_t warp, int64_t row_words) {
  const int64_t chunks = (row_words + 31) / 32;
  BitsRun run;
  run.row = warp / chunks;
  run.word0 = warp % chunks * 32;
  run.n_words = static_cast<int>(row_words - run.word0 < 32 ? row_words - run.word0 : 32);
  return run;
}

NCL_FAST_HD int64_t run_pixel(const BitsRun& run, int j, int lane) { return (run.word0 + j) * 32 + lane; }

// The element offset of mask row `row` (= b * H + y), the mask's batch and row strides sb, sy.
NCL_FAST_HD int64_t mask_row_offset(int64_t row, int64_t height, int64_t sb, int64_t sy) {
  return row / height * sb + row % height * sy;
}

// g of cell (y, x) of a prediction with strides (sy, sx), from one image's bits:
// 1 when at least half of the cell's sy x sx pixels are set (the area mean of
// 1[M > 0.5] >= 0.5, in integers).
NCL_FAST_HD uint8_t cell_target(const uint32_t* image_bits, int64_t row_words, int64_t sy, int64_t sx, int64_t y,
                                int64_t x) {
  int64_t count = 0;
  for (int64_t dy = 0; dy < sy; ++dy) count += count_bits(image_bits + (y * sy + dy) * row_words, x * sx, sx);
  return 2 * count >= sy * sx;
}

}  // namespace ncl_fast
