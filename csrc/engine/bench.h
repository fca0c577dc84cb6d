// Timed loops for `anemll-fast bench` (anemll_fast/bench), compiled with the engine so that the figures
// carry no Python: each loop writes one duration per repetition into an array the caller preallocated,
// and Python only reads the arrays. Durations are nanoseconds of monotonic_ns().
#pragma once

#include <cstdint>

#include "engine/engine.h"
#include "engine/sampler.h"

namespace anemll {

// n decode steps from (token, pos): step k feeds the token step k-1 produced at pos + k. tokens_out[k] is
// what step k produced, ns_out[k] its duration. *done: steps completed (all n unless one failed, when the
// engine's status is returned and its error() says why).
int bench_decode(Engine& engine, int32_t token, int64_t pos, int64_t n, int32_t* tokens_out, int64_t* ns_out,
                 int64_t* done);

// `reps` times: a fresh cache, the prompt's first n-1 tokens prefilled, then the first new token from a step at
// the last prompt position (ANEMLL's rule). prefill_ns[r]: the prefill alone; first_ns[r]: prefill and that step,
// the time to the first token. *first_token: what it was.
int bench_prefill(Engine& engine, const int32_t* tokens, int64_t n, int64_t reps, int64_t* prefill_ns,
                  int64_t* first_ns, int32_t* first_token);

// `reps` samples over the same parts (the sampler restores what it overrides), each timed.
// Returns 0, or -1 with sampler.error() set.
int bench_sampler(Sampler& sampler, LogitsPart* parts, int n_parts, const int32_t* history, int64_t history_len,
                  int64_t reps, int64_t* ns_out, int32_t* last_token);

// The bandwidth floor of a sampler: `reps` times, read every fp16 entry of the parts once (an OR of their bit
// patterns, returned so that the reads cannot be optimised away).
uint16_t bench_read_parts(const LogitsPart* parts, int n_parts, int64_t reps, int64_t* ns_out);

}  // namespace anemll
