// Token samplers over the LM head's fp16 logits parts, read in place.
//
// The chain, applied in this order (the Python twin is anemll_fast.sampling):
//   logit bias -> penalties over the last `penalty_window` tokens (repetition:
//   divide positive / multiply negative logits; frequency: minus count*f;
//   presence: minus p) -> greedy argmax if temperature == 0, else top-k ->
//   temperature -> softmax -> top-p (smallest prefix with mass >= top_p) ->
//   min-p (keep p >= min_p * p_max) -> draw from the renormalised rest.
// Ties are broken towards the lower token id (-0 and +0 tie, except at the
// boundary of a small top-k, where +0 ranks first). NaN logits are
// never chosen.
//
// Without top-k (or with a large one) the sampler never sorts the vocabulary:
// one pass counts the fp16 logits per value (a 65536-bin histogram), so that
// softmax masses, the top-p and min-p thresholds and the k-th best value are
// found per distinct value; only the tokens above the threshold are gathered.
// Log-probabilities are those of the model's raw distribution (log-softmax of
// the unmodified logits).
//
// A token mask (a grammar's allow-list, set per step with set_token_mask)
// comes first in the chain: forbidden tokens read -inf for the whole chain, and
// the logits are restored afterwards like every other override.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace anemll {

struct LogitsPart {
  uint16_t* data;  // fp16 bits; the sampler may write and restore entries
  int64_t size;
  int64_t offset;  // id of this part's first token
};

struct SamplerConfig {
  float temperature = 0.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t penalty_window = 64;  // -1: whole history
  std::vector<int32_t> bias_tokens;
  std::vector<float> bias_values;
  uint64_t seed = 0;
  int32_t top_logprobs = -1;  // <0: none; 0: chosen token only; n: also the n best
};

struct Candidate {
  float v;
  int32_t id;
};

class Sampler {
 public:
  // Validates and preallocates everything sample() needs; "" or an error message.
  std::string configure(const SamplerConfig& cfg, int64_t vocab_size, int64_t max_history);
  void reseed(uint64_t seed) { rng_.seed(seed); }
  // The RNG's position as text, and back: a generation interrupted by another
  // one on the same engine resumes its random stream where it was.
  std::string rng_state() const;
  bool set_rng_state(const std::string& state);
  bool greedy() const { return cfg_.temperature == 0.0f || cfg_.top_k == 1; }
  bool wants_logits() const;  // false when an in-model argmax suffices

  // A per-step allow-list: bit (t % 32) of words[t / 32] set means token t may
  // be sampled; tokens at or past n_bits never are. The caller owns `words` and
  // may rewrite them between steps (a grammar matcher does, once per token);
  // nullptr removes the mask. Sizes the scratch once: sample() stays allocation-free.
  void set_token_mask(const uint32_t* words, int64_t n_bits);
  bool has_token_mask() const { return mask_ != nullptr; }
  const SamplerConfig& config() const { return cfg_; }

  // Picks the next token from the parts (which together cover [0, vocab)).
  // history: token ids fed so far (for penalties). Returns 0 or -1 (see error()).
  int sample(LogitsPart* parts, int n_parts, const int32_t* history, int64_t history_len,
             int32_t* token);
  const char* error() const { return error_; }
  // Tokens the last stochastic draw weighed after its cuts (not reset by a greedy sample).
  size_t candidates() const { return cand_.size(); }

  // Filled by sample() when top_logprobs >= 0.
  float chosen_logprob = 0.0f;
  int32_t n_top = 0;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;

 private:
  float raw(const LogitsPart* parts, int n_parts, int32_t tok, uint16_t** slot) const;
  void set_override(int32_t tok, float v, uint16_t* slot, uint16_t bits);
  int32_t greedy_pick(const LogitsPart* parts, int n_parts);
  int stochastic_pick(const LogitsPart* parts, int n_parts, int32_t* token);
  void top_by_key(const LogitsPart* parts, int n_parts, int32_t k);  // into heap_
  void build_histogram(const LogitsPart* parts, int n_parts);         // hist_, lo_, hi_
  void clear_histogram();
  void top_by_histogram(const LogitsPart* parts, int n_parts, int32_t k);  // into cand_
  void gather_at_least(const LogitsPart* parts, int n_parts, int32_t idx);  // cand_, cum_ (id order)
  void gather_sorted(const LogitsPart* parts, int n_parts, int32_t idx);    // cand_, cum_ (best first)
  double fill_weights(float vmax, double inv_t);  // wtab_ for occupied values; their total mass
  int vocab_pick(const LogitsPart* parts, int n_parts, int32_t* token);    // no top-k
  // top-p cut, min-p, the draw over cand_ (weights in cum_ if `weighted`).
  int draw(float vmax, double inv_t, double z_all, bool weighted, int32_t* token);
  void compute_logprobs(const LogitsPart* parts, int n_parts, int32_t token);
  template <class Visit>
  void for_each_masked_run(LogitsPart* parts, int n_parts, Visit visit) const;
  void apply_token_mask(LogitsPart* parts, int n_parts);  // saves what it overwrites into mask_saved_
  void restore_token_mask(LogitsPart* parts, int n_parts);

  SamplerConfig cfg_;
  int64_t vocab_ = 0;
  std::mt19937_64 rng_;
  const char* error_ = "";
  // Sparse overrides from bias and penalties (slot_of_ maps token -> index).
  std::vector<int32_t> slot_of_;
  std::vector<Candidate> over_;
  std::vector<uint16_t*> over_slot_;
  std::vector<uint16_t> over_bits_;
  std::vector<int32_t> counts_;
  std::vector<int32_t> touched_;
  std::vector<Candidate> cand_;
  std::vector<Candidate> heap_;
  std::vector<double> cum_;
  // Histogram over canonical fp16 keys (index = key + 32768, so ascending in value)
  // and the softmax weight of each occupied value; [lo_, hi_] is the occupied range.
  std::vector<uint32_t> hist_;
  std::vector<double> wtab_;
  int32_t lo_ = 0, hi_ = -1;
  std::vector<Candidate> ovs_;  // finite overrides, best first
  double rpow_[128];             // powers of one value step's weight ratio
  const uint32_t* mask_ = nullptr;
  int64_t mask_bits_ = 0;
  std::vector<uint16_t> mask_saved_;  // the raw logits while the mask is applied
};

// Index of the largest logit across parts (lowest id on ties, NaN ignored);
// -1 if every entry is -inf or NaN.
int64_t argmax_parts(const LogitsPart* parts, int n_parts);

}  // namespace anemll
