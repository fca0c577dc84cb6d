#include "engine/bench.h"

#include <algorithm>

namespace anemll {

int bench_decode(Engine& engine, int32_t token, int64_t pos, int64_t n, int32_t* tokens_out, int64_t* ns_out,
                 int64_t* done) {
  *done = 0;
  for (int64_t k = 0; k < n; ++k) {
    int32_t next = -1;
    const int64_t t0 = monotonic_ns();
    const int rc = engine.step(token, pos + k, &next);
    ns_out[k] = monotonic_ns() - t0;
    if (rc != kOk) return rc;
    tokens_out[k] = next;
    token = next;
    *done = k + 1;
  }
  return kOk;
}

int bench_prefill(Engine& engine, const int32_t* tokens, int64_t n, int64_t reps, int64_t* prefill_ns,
                  int64_t* first_ns, int32_t* first_token) {
  if (n <= 0) return kInvalidArgument;
  for (int64_t r = 0; r < reps; ++r) {
    const int64_t t0 = monotonic_ns();
    if (int rc = engine.reset()) return rc;
    if (n > 1)
      if (int rc = engine.prefill(tokens, n - 1, 0)) return rc;
    const int64_t t1 = monotonic_ns();
    if (int rc = engine.step(tokens[n - 1], n - 1, first_token)) return rc;
    const int64_t t2 = monotonic_ns();
    prefill_ns[r] = t1 - t0;
    first_ns[r] = t2 - t0;
  }
  return kOk;
}

int bench_sampler(Sampler& sampler, LogitsPart* parts, int n_parts, const int32_t* history, int64_t history_len,
                  int64_t reps, int64_t* ns_out, int32_t* last_token) {
  for (int64_t r = 0; r < reps; ++r) {
    const int64_t t0 = monotonic_ns();
    const int rc = sampler.sample(parts, n_parts, history, history_len, last_token);
    ns_out[r] = monotonic_ns() - t0;
    if (rc != 0) return rc;
  }
  return 0;
}

uint16_t bench_read_parts(const LogitsPart* parts, int n_parts, int64_t reps, int64_t* ns_out) {
  uint16_t seen = 0;
  for (int64_t r = 0; r < reps; ++r) {
    const int64_t t0 = monotonic_ns();
    uint16_t m = 0;  // an OR of every entry: vectorizes on any SIMD baseline, as fast as the reads allow
    for (int p = 0; p < n_parts; ++p) {
      const uint16_t* d = parts[p].data;
      for (int64_t i = 0; i < parts[p].size; ++i) m = static_cast<uint16_t>(m | d[i]);
    }
    ns_out[r] = monotonic_ns() - t0;
    seen = static_cast<uint16_t>(seen | m);
  }
  return seen;
}

}  // namespace anemll
