// Fused element-wise kernels for the reference backend: the op chains that ANEMLL's decode graphs
// spell out op by op (RMSNorm as a layer_norm over [x, -x], rotary embedding, the SiLU-gated
// product), each computed in one pass over float32 data holding fp16-exact values.
//
// Fidelity: each kernel rounds to fp16 (round to nearest even, as the op-by-op path's finisher does)
// exactly where the MIL chain it replaces has an fp16 output, and nowhere else; with round16 false
// (fp32 programs) it does not round at all. Arithmetic is the chain's, in its order, in float32, so
// the results are bit-identical to the op-by-op path; the norm's sums follow numpy's pairwise
// summation order for the same reason. Single-threaded; the caller releases the GIL.
#pragma once

#include <cstdint>

namespace anemll {
namespace kernels {

// out[i] = x[i] rounded to the nearest fp16 value (out may be x).
void round_f16(const float* x, int64_t n, float* out);

// ANEMLL's RMSNorm: for each of `rows` rows of h values, layer_norm over the 2h values [x, -x]
// (mean, then the mean of squared deviations, in numpy's pairwise order), times gamma[0:h]
// (+ beta[0:h] when not null), keeping the first h outputs. Returns 0, or -1 on bad arguments.
int mirror_norm(const float* x, int64_t rows, int64_t h, const float* gamma, const float* beta, float eps,
                bool round16, float* out);

// Rotary embedding of `groups` blocks of [t, d] values (d even) with one [t, d] table each of cos
// and sin shared by every block: out = r(r(x * cos) + r(rot(x) * sin)), rot(x) = [-x[d/2:], x[:d/2]]
// per row, r() the fp16 rounding (identity when round16 is false). Returns 0, or -1 on bad arguments.
int rotary(const float* x, int64_t groups, int64_t t, int64_t d, const float* cos, const float* sin,
           bool round16, float* out);

// Which vector path the element-wise kernels run ("avx2+fma+f16c", "neon" or "portable"); the same
// ANEMLL_FAST_KERNELS=portable override as the matrix kernels applies.
const char* elementwise_isa();

}  // namespace kernels
}  // namespace anemll
