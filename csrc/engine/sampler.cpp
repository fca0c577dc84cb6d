#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/fp16.h"

namespace anemll {

const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_to_float(static_cast<uint16_t>(i));
    return t;
  }();
  return table.data();
}

namespace {

constexpr int16_t kKeyPosInf = 0x7C00;
constexpr int64_t kBlock = 64;

// NaN (either sign) maps at or below -inf so that it is never chosen.
inline int16_t masked_key(uint16_t h) {
  const int16_t k = half_key(h);
  return k > kKeyPosInf ? kKeyNegInf : k;
}

// Plain loop so that the compiler vectorizes it (pmaxsw on SSE2, smax on NEON).
int16_t block_max(const uint16_t* d, int64_t n) {
  int16_t m = std::numeric_limits<int16_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    const int16_t k = masked_key(d[i]);
    m = k > m ? k : m;
  }
  return m;
}

// a is a better candidate than b: larger value, then lower id.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.v > b.v || (a.v == b.v && a.id < b.id);
}

struct KeyItem {
  int16_t key;
  int32_t id;
};
// Heap ordered so that its front is the worst item kept.
inline bool key_better(const KeyItem& a, const KeyItem& b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}

inline double uniform01(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace

int64_t argmax_parts(const LogitsPart* parts, int n_parts) {
  int16_t best = std::numeric_limits<int16_t>::min();
  const uint16_t* best_block = nullptr;
  int64_t best_len = 0, best_base = 0;
  for (int p = 0; p < n_parts; ++p) {
    const uint16_t* d = parts[p].data;
    for (int64_t s = 0; s < parts[p].size; s += 4 * kBlock) {
      const int64_t n = std::min<int64_t>(4 * kBlock, parts[p].size - s);
      const int16_t m = block_max(d + s, n);
      if (m > best) {
        best = m;
        best_block = d + s;
        best_len = n;
        best_base = parts[p].offset + s;
      }
    }
  }
  if (best_block == nullptr || best <= kKeyNegInf) return -1;
  for (int64_t i = 0; i < best_len; ++i)
    if (masked_key(best_block[i]) == best) return best_base + i;
  return -1;  // unreachable
}

std::string Sampler::configure(const SamplerConfig& cfg, int64_t vocab, int64_t max_history) {
  auto finite = [](float x) { return std::isfinite(x); };
  if (!finite(cfg.temperature) || cfg.temperature < 0) return "temperature must be >= 0";
  if (cfg.top_k < 0) return "top_k must be >= 0";
  if (!(cfg.top_p > 0.0f && cfg.top_p <= 1.0f)) return "top_p must be in (0, 1]";
  if (!(cfg.min_p >= 0.0f && cfg.min_p <= 1.0f)) return "min_p must be in [0, 1]";
  if (!finite(cfg.repetition_penalty) || cfg.repetition_penalty <= 0)
    return "repetition_penalty must be > 0";
  if (!finite(cfg.presence_penalty)) return "presence_penalty must be finite";
  if (!finite(cfg.frequency_penalty)) return "frequency_penalty must be finite";
  if (cfg.penalty_window < -1) return "penalty_window must be >= 0 or -1 (whole history)";
  if (cfg.bias_tokens.size() != cfg.bias_values.size()) return "logit_bias: tokens and values differ in length";
  for (size_t i = 0; i < cfg.bias_tokens.size(); ++i) {
    if (cfg.bias_tokens[i] < 0 || cfg.bias_tokens[i] >= vocab)
      return "logit_bias: token id " + std::to_string(cfg.bias_tokens[i]) + " is outside the vocabulary [0, " +
             std::to_string(vocab) + ")";
    if (std::isnan(cfg.bias_values[i]) || cfg.bias_values[i] == std::numeric_limits<float>::infinity())
      return "logit_bias: value for token " + std::to_string(cfg.bias_tokens[i]) + " must be finite or -inf";
    for (size_t j = 0; j < i; ++j)
      if (cfg.bias_tokens[j] == cfg.bias_tokens[i])
        return "logit_bias: token id " + std::to_string(cfg.bias_tokens[i]) + " is listed twice";
  }
  if (cfg.top_logprobs > 1024) return "top_logprobs must be <= 1024";
  cfg_ = cfg;
  vocab_ = vocab;
  rng_.seed(cfg.seed);
  // Everything sample() touches is sized here, once.
  const size_t n_over = cfg.bias_tokens.size() + static_cast<size_t>(std::max<int64_t>(0, max_history));
  slot_of_.assign(static_cast<size_t>(vocab), -1);
  counts_.assign(static_cast<size_t>(vocab), 0);
  over_.clear();
  over_.reserve(n_over);
  over_slot_.reserve(n_over);
  over_bits_.reserve(n_over);
  touched_.reserve(n_over);
  const size_t k = (cfg.top_k > 0 && cfg.top_k < vocab) ? static_cast<size_t>(cfg.top_k) : static_cast<size_t>(vocab);
  const size_t tlp = static_cast<size_t>(std::max(cfg.top_logprobs, 0));
  cand_.reserve(std::max(k, tlp) + n_over);
  cum_.reserve(k + n_over);
  heap_.reserve(std::max<size_t>(k, static_cast<size_t>(std::max(cfg.top_logprobs, 0))) + 1);
  top_ids.assign(static_cast<size_t>(std::max(cfg.top_logprobs, 0)), -1);
  top_logprobs.assign(static_cast<size_t>(std::max(cfg.top_logprobs, 0)), 0.0f);
  return "";
}

bool Sampler::wants_logits() const {
  return !greedy() || !cfg_.bias_tokens.empty() || cfg_.repetition_penalty != 1.0f ||
         cfg_.presence_penalty != 0.0f || cfg_.frequency_penalty != 0.0f || cfg_.top_logprobs >= 0;
}

float Sampler::raw(const LogitsPart* parts, int n_parts, int32_t tok, uint16_t** slot) const {
  for (int p = 0; p < n_parts; ++p) {
    const int64_t local = tok - parts[p].offset;
    if (local >= 0 && local < parts[p].size) {
      *slot = parts[p].data + local;
      return half_to_float(**slot);
    }
  }
  *slot = nullptr;
  return -std::numeric_limits<float>::infinity();
}

void Sampler::set_override(int32_t tok, float v, uint16_t* slot, uint16_t bits) {
  int32_t& s = slot_of_[static_cast<size_t>(tok)];
  if (s >= 0) {
    over_[static_cast<size_t>(s)].v = v;
    return;
  }
  s = static_cast<int32_t>(over_.size());
  over_.push_back({v, tok});
  over_slot_.push_back(slot);
  over_bits_.push_back(bits);
}

void Sampler::top_by_key(const LogitsPart* parts, int n_parts, int32_t k) {
  // Max-k selection on raw fp16 keys; whole blocks below the k-th best are skipped.
  auto* heap = reinterpret_cast<KeyItem*>(cand_.data());  // scratch reuse, no allocation
  size_t n = 0;
  const size_t kk = static_cast<size_t>(k);
  for (int p = 0; p < n_parts; ++p) {
    const uint16_t* d = parts[p].data;
    for (int64_t s = 0; s < parts[p].size; s += kBlock) {
      const int64_t len = std::min<int64_t>(kBlock, parts[p].size - s);
      const int16_t bm = block_max(d + s, len);
      if (bm <= kKeyNegInf) continue;
      if (n == kk && bm <= heap[0].key) continue;
      for (int64_t i = 0; i < len; ++i) {
        const int16_t key = masked_key(d[s + i]);
        if (key <= kKeyNegInf) continue;
        const KeyItem item{key, static_cast<int32_t>(parts[p].offset + s + i)};
        if (n < kk) {
          heap[n++] = item;
          std::push_heap(heap, heap + n, key_better);
        } else if (key > heap[0].key) {
          std::pop_heap(heap, heap + n, key_better);
          heap[n - 1] = item;
          std::push_heap(heap, heap + n, key_better);
        }
      }
    }
  }
  // Move into heap_ as candidates (value from the key's half).
  heap_.clear();
  const float* table = half_table();
  for (size_t i = 0; i < n; ++i) {
    const int16_t key = heap[i].key;
    const uint16_t bits = static_cast<uint16_t>(key < 0 ? (key ^ 0x7FFF) : key);
    heap_.push_back({table[bits], heap[i].id});
  }
}

int32_t Sampler::greedy_pick(const LogitsPart* parts, int n_parts) {
  const int64_t idx = argmax_parts(parts, n_parts);
  Candidate best{-std::numeric_limits<float>::infinity(), -1};
  if (idx >= 0) {
    uint16_t* slot;
    best = {raw(parts, n_parts, static_cast<int32_t>(idx), &slot), static_cast<int32_t>(idx)};
  }
  for (const Candidate& o : over_)
    if (o.v > -std::numeric_limits<float>::infinity() && (best.id < 0 || better(o, best))) best = o;
  return best.id;
}

int Sampler::stochastic_pick(const LogitsPart* parts, int n_parts, int32_t* token) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const bool use_k = cfg_.top_k > 0 && cfg_.top_k < vocab_;
  // cand_ doubles as the heap scratch of top_by_key: fill it only afterwards.
  if (use_k) {
    cand_.resize(static_cast<size_t>(cfg_.top_k));  // within reserve: no allocation
    top_by_key(parts, n_parts, cfg_.top_k);
    cand_.clear();
    for (const Candidate& c : heap_) cand_.push_back(c);
  } else {
    cand_.clear();
    const float* table = half_table();
    for (int p = 0; p < n_parts; ++p) {
      const uint16_t* d = parts[p].data;
      for (int64_t i = 0; i < parts[p].size; ++i)
        if (masked_key(d[i]) > kKeyNegInf) cand_.push_back({table[d[i]], static_cast<int32_t>(parts[p].offset + i)});
    }
  }
  for (const Candidate& o : over_)
    if (o.v > ninf) cand_.push_back(o);
  if (use_k && cand_.size() > static_cast<size_t>(cfg_.top_k)) {
    std::nth_element(cand_.begin(), cand_.begin() + cfg_.top_k, cand_.end(), better);
    cand_.resize(static_cast<size_t>(cfg_.top_k));
  }
  if (cand_.empty()) {
    error_ = "no token left to sample: every logit is -inf or NaN after logit_bias and penalties";
    return -1;
  }
  const bool use_p = cfg_.top_p < 1.0f;
  const float inv_t = 1.0f / cfg_.temperature;
  float vmax = ninf;
  for (const Candidate& c : cand_) vmax = std::max(vmax, c.v);
  auto weight = [&](const Candidate& c) { return std::exp(static_cast<double>((c.v - vmax) * inv_t)); };
  double z_all = -1.0;  // mass of every candidate when only a sorted head is kept
  if (use_p && cand_.size() > 1024) {
    // Top-p over a large vocabulary: sort only a head big enough to hold the mass.
    z_all = 0.0;
    for (const Candidate& c : cand_) z_all += weight(c);
    size_t m = 1024;
    for (;;) {
      std::partial_sort(cand_.begin(), cand_.begin() + static_cast<std::ptrdiff_t>(m), cand_.end(), better);
      double head = 0.0;
      for (size_t i = 0; i < m; ++i) head += weight(cand_[i]);
      if (head >= static_cast<double>(cfg_.top_p) * z_all || m == cand_.size()) break;
      m = std::min(cand_.size(), m * 4);
    }
    cand_.resize(m);
  } else if (use_p) {
    std::sort(cand_.begin(), cand_.end(), better);
  }
  cum_.clear();
  double z = 0.0;
  for (const Candidate& c : cand_) {
    const double w = weight(c);
    z += w;
    cum_.push_back(w);
  }
  if (z_all >= 0.0) z = z_all;
  size_t keep = cand_.size();
  if (use_p) {
    double acc = 0.0;
    const double target = static_cast<double>(cfg_.top_p) * z;
    for (size_t i = 0; i < keep; ++i) {
      acc += cum_[i];
      if (acc >= target) {
        keep = i + 1;
        break;
      }
    }
  }
  // min-p relative to the best (weight 1 after subtracting vmax).
  const double min_w = static_cast<double>(cfg_.min_p);
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    if (cum_[i] < min_w) cum_[i] = 0.0;
    total += cum_[i];
  }
  const double u = uniform01(rng_) * total;
  double acc = 0.0;
  int32_t pick = -1;
  for (size_t i = 0; i < keep; ++i) {
    if (cum_[i] <= 0.0) continue;
    acc += cum_[i];
    pick = cand_[i].id;
    if (u < acc) break;
  }
  *token = pick;
  return 0;
}

void Sampler::compute_logprobs(const LogitsPart* parts, int n_parts, int32_t token) {
  const float* table = half_table();
  const int64_t imax = argmax_parts(parts, n_parts);
  n_top = 0;
  if (imax < 0) {
    chosen_logprob = -std::numeric_limits<float>::infinity();
    return;
  }
  uint16_t* slot;
  const double vmax = raw(parts, n_parts, static_cast<int32_t>(imax), &slot);
  double z = 0.0;
  for (int p = 0; p < n_parts; ++p) {
    const uint16_t* d = parts[p].data;
    for (int64_t i = 0; i < parts[p].size; ++i)
      if (masked_key(d[i]) > kKeyNegInf) z += std::exp(static_cast<double>(table[d[i]]) - vmax);
  }
  const double lse = vmax + std::log(z);
  const float v = raw(parts, n_parts, token, &slot);
  chosen_logprob = static_cast<float>(static_cast<double>(v) - lse);
  if (cfg_.top_logprobs > 0) {
    cand_.resize(static_cast<size_t>(cfg_.top_logprobs));  // scratch within reserve
    top_by_key(parts, n_parts, cfg_.top_logprobs);
    std::sort(heap_.begin(), heap_.end(), better);
    n_top = static_cast<int32_t>(heap_.size());
    for (int32_t i = 0; i < n_top; ++i) {
      top_ids[static_cast<size_t>(i)] = heap_[static_cast<size_t>(i)].id;
      top_logprobs[static_cast<size_t>(i)] = static_cast<float>(heap_[static_cast<size_t>(i)].v - lse);
    }
  }
}

int Sampler::sample(LogitsPart* parts, int n_parts, const int32_t* history, int64_t history_len,
                    int32_t* token) {
  error_ = "";
  // 1. Sparse overrides: bias, then penalties. Their slots read -inf meanwhile.
  for (size_t i = 0; i < cfg_.bias_tokens.size(); ++i) {
    uint16_t* slot;
    const int32_t tok = cfg_.bias_tokens[i];
    const float v = raw(parts, n_parts, tok, &slot);
    set_override(tok, v + cfg_.bias_values[i], slot, slot ? *slot : kHalfNegInf);
  }
  const bool penalize = cfg_.repetition_penalty != 1.0f || cfg_.presence_penalty != 0.0f ||
                        cfg_.frequency_penalty != 0.0f;
  if (penalize && history_len > 0) {
    const int64_t start = cfg_.penalty_window < 0 ? 0 : std::max<int64_t>(0, history_len - cfg_.penalty_window);
    for (int64_t i = start; i < history_len; ++i) {
      const int32_t t = history[i];
      if (t < 0 || t >= vocab_) continue;
      if (counts_[static_cast<size_t>(t)]++ == 0) touched_.push_back(t);
    }
    for (int32_t t : touched_) {
      const int32_t s = slot_of_[static_cast<size_t>(t)];
      uint16_t* slot;
      float v = raw(parts, n_parts, t, &slot);
      const uint16_t bits = slot ? *slot : kHalfNegInf;
      if (s >= 0) v = over_[static_cast<size_t>(s)].v;
      const float r = cfg_.repetition_penalty;
      if (r != 1.0f) v = v > 0 ? v / r : v * r;
      v -= static_cast<float>(counts_[static_cast<size_t>(t)]) * cfg_.frequency_penalty + cfg_.presence_penalty;
      set_override(t, v, slot, bits);
      counts_[static_cast<size_t>(t)] = 0;
    }
    touched_.clear();
  }
  for (uint16_t* slot : over_slot_)
    if (slot) *slot = kHalfNegInf;

  int rc = 0;
  if (greedy()) {
    *token = greedy_pick(parts, n_parts);
    if (*token < 0) {
      error_ = "no token left to choose: every logit is -inf or NaN after logit_bias and penalties";
      rc = -1;
    }
  } else {
    rc = stochastic_pick(parts, n_parts, token);
  }

  // 2. Restore the raw logits (log-probabilities and callers see the model's values).
  for (size_t i = 0; i < over_.size(); ++i) {
    if (over_slot_[i]) *over_slot_[i] = over_bits_[i];
    slot_of_[static_cast<size_t>(over_[i].id)] = -1;
  }
  over_.clear();
  over_slot_.clear();
  over_bits_.clear();
  if (rc == 0 && cfg_.top_logprobs >= 0) compute_logprobs(parts, n_parts, *token);
  return rc;
}

}  // namespace anemll
