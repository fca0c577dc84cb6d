#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

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

// -0 is filed as +0: equal values share a bin, so ties among them go by id.
inline int16_t canon_key(uint16_t h) { return masked_key(h == 0x8000u ? 0 : h); }
constexpr int32_t kIndexBias = 32768;  // histogram index = key + 32768: ascending in value
constexpr int32_t kNegInfIndex = kKeyNegInf + kIndexBias;
// Above this top_k, a histogram select beats the heap (measured on Qwen's 151936 logits).
constexpr int32_t kHeapMaxK = 256;

inline float index_value(const float* table, int32_t idx) {
  const int16_t key = static_cast<int16_t>(idx - kIndexBias);
  return table[static_cast<uint16_t>(key < 0 ? (key ^ 0x7FFF) : key)];
}

// Raw-key lower bound of the blocks that may hold canonical key `k` (-0 has raw key -1).
inline int16_t raw_floor(int16_t k) { return k == 0 ? static_cast<int16_t>(-1) : k; }

// Calls visit(key, raw, id) for every logit whose key is at least tk, in id
// order, skipping whole blocks whose maximum is below it.
template <class Visit>
inline void for_each_at_least(const LogitsPart* parts, int n_parts, int16_t tk, Visit visit) {
  const int16_t floor = raw_floor(tk);
  for (int p = 0; p < n_parts; ++p) {
    const uint16_t* d = parts[p].data;
    for (int64_t s = 0; s < parts[p].size; s += kBlock) {
      const int64_t len = std::min<int64_t>(kBlock, parts[p].size - s);
      if (block_max(d + s, len) < floor) continue;
      for (int64_t i = s; i < s + len; ++i) {
        const int16_t key = canon_key(d[i]);
        if (key >= tk) visit(key, d[i], static_cast<int32_t>(parts[p].offset + i));
      }
    }
  }
}

// Smallest and largest masked key, as plain reductions the compiler vectorizes.
void key_range(const uint16_t* d, int64_t n, int16_t* lo, int16_t* hi) {
  int16_t a = std::numeric_limits<int16_t>::max(), b = std::numeric_limits<int16_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    const int16_t k = masked_key(d[i]);
    a = k < a ? k : a;
    b = k > b ? k : b;
  }
  *lo = std::min(*lo, a);
  *hi = std::max(*hi, b);
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

std::string Sampler::rng_state() const {
  std::ostringstream out;
  out << rng_;
  return out.str();
}

bool Sampler::set_rng_state(const std::string& state) {
  std::istringstream in(state);
  std::mt19937_64 rng;
  if (!(in >> rng)) return false;
  rng_ = rng;
  return true;
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
  ovs_.clear();
  ovs_.reserve(n_over);
  const bool histogram = !greedy() && (k == static_cast<size_t>(vocab) || cfg.top_k > kHeapMaxK);
  hist_.assign(histogram ? 65536 : 0, 0u);
  wtab_.assign(histogram ? 65536 : 0, 0.0);
  lo_ = 0;
  hi_ = -1;
  top_ids.assign(static_cast<size_t>(std::max(cfg.top_logprobs, 0)), -1);
  top_logprobs.assign(static_cast<size_t>(std::max(cfg.top_logprobs, 0)), 0.0f);
  if (mask_) mask_saved_.resize(static_cast<size_t>(vocab));
  return "";
}

bool Sampler::wants_logits() const {
  return mask_ != nullptr || !greedy() || !cfg_.bias_tokens.empty() || cfg_.repetition_penalty != 1.0f ||
         cfg_.presence_penalty != 0.0f || cfg_.frequency_penalty != 0.0f || cfg_.top_logprobs >= 0;
}

void Sampler::set_token_mask(const uint32_t* words, int64_t n_bits) {
  mask_ = n_bits > 0 ? words : nullptr;
  mask_bits_ = mask_ ? n_bits : 0;
  if (mask_ && mask_saved_.size() < static_cast<size_t>(vocab_)) mask_saved_.resize(static_cast<size_t>(vocab_));
}

template <class Visit>
void Sampler::for_each_masked_run(LogitsPart* parts, int n_parts, Visit visit) const {
  // Word by word: visit(data, count, allowed bits) for every run of at most 32
  // tokens that has a forbidden one; fully allowed runs cost one compare.
  for (int p = 0; p < n_parts; ++p) {
    uint16_t* d = parts[p].data;
    const int64_t size = parts[p].size, offset = parts[p].offset;
    int64_t i = 0;
    while (i < size) {
      const int64_t g = offset + i;
      if (g >= mask_bits_) {  // past the mask: never sampled
        for (int64_t j = i; j < size; j += 32) visit(d + j, std::min<int64_t>(32, size - j), 0u);
        break;
      }
      const int64_t bit = g & 31;
      const int64_t run = std::min<int64_t>({32 - bit, size - i, mask_bits_ - g});
      const uint32_t ones = run == 32 ? 0xFFFFFFFFu : ((1u << run) - 1u);
      const uint32_t allowed = (mask_[g >> 5] >> bit) & ones;
      if (allowed != ones) visit(d + i, run, allowed);
      i += run;
    }
  }
}

void Sampler::apply_token_mask(LogitsPart* parts, int n_parts) {
  // The overwritten runs are saved in order, so that restore_token_mask puts them back.
  uint16_t* saved = mask_saved_.data();
  for_each_masked_run(parts, n_parts, [&](uint16_t* d, int64_t n, uint32_t allowed) {
    std::copy(d, d + n, saved);
    saved += n;
    if (allowed == 0) {
      std::fill(d, d + n, kHalfNegInf);
      return;
    }
    for (uint32_t forbid = ~allowed & (n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u)); forbid; forbid &= forbid - 1)
      d[__builtin_ctz(forbid)] = kHalfNegInf;
  });
}

void Sampler::restore_token_mask(LogitsPart* parts, int n_parts) {
  const uint16_t* saved = mask_saved_.data();
  for_each_masked_run(parts, n_parts, [&](uint16_t* d, int64_t n, uint32_t) {
    std::copy(saved, saved + n, d);
    saved += n;
  });
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

void Sampler::build_histogram(const LogitsPart* parts, int n_parts) {
  int16_t lo = std::numeric_limits<int16_t>::max(), hi = std::numeric_limits<int16_t>::min();
  uint32_t* h = hist_.data();
  for (int p = 0; p < n_parts; ++p) {
    const uint16_t* d = parts[p].data;
    key_range(d, parts[p].size, &lo, &hi);
    for (int64_t i = 0; i < parts[p].size; ++i) ++h[canon_key(d[i]) + kIndexBias];
  }
  if (lo > hi) {  // no entries at all
    lo_ = 0;
    hi_ = -1;
    return;
  }
  lo_ = lo + kIndexBias;
  hi_ = (hi == -1 ? 0 : hi) + kIndexBias;  // a -0 maximum is filed as +0
}

void Sampler::clear_histogram() {
  // Only the occupied range: cheaper than the whole 256 KiB.
  if (hi_ >= lo_)
    std::fill(hist_.begin() + lo_, hist_.begin() + hi_ + 1, 0u);
  lo_ = 0;
  hi_ = -1;
}

void Sampler::top_by_histogram(const LogitsPart* parts, int n_parts, int32_t k) {
  // The k-th best value from the counts, then one gathering pass in id order:
  // every token above it, and as many of its ties as fit, lowest ids first.
  build_histogram(parts, n_parts);
  const int32_t stop = std::max(lo_, kNegInfIndex + 1);
  uint64_t above = 0, quota = std::numeric_limits<uint64_t>::max();
  int32_t kb = stop;
  for (int32_t idx = hi_; idx >= stop; --idx) {
    const uint64_t c = hist_[static_cast<size_t>(idx)];
    if (above + c >= static_cast<uint64_t>(k)) {
      kb = idx;
      quota = static_cast<uint64_t>(k) - above;
      break;
    }
    above += c;
  }
  clear_histogram();
  cand_.clear();
  const float* table = half_table();
  const int16_t tk = static_cast<int16_t>(kb - kIndexBias);
  for_each_at_least(parts, n_parts, tk, [&](int16_t key, uint16_t raw, int32_t id) {
    if (key == tk) {
      if (quota == 0) return;
      --quota;
    }
    cand_.push_back({table[raw], id});
  });
}

void Sampler::gather_at_least(const LogitsPart* parts, int n_parts, int32_t idx) {
  // Every finite token whose value is at least that of histogram index idx, in id order.
  const float* table = half_table();
  const double* w = wtab_.data();
  const int16_t tk = static_cast<int16_t>(std::max(idx, kNegInfIndex + 1) - kIndexBias);
  for_each_at_least(parts, n_parts, tk, [&](int16_t key, uint16_t raw, int32_t id) {
    cand_.push_back({table[raw], id});
    cum_.push_back(w[key + kIndexBias]);
  });
}

void Sampler::gather_sorted(const LogitsPart* parts, int n_parts, int32_t idx) {
  // Counting sort: the histogram gives each value's slot range (best value
  // first); scanning in id order fills each range lowest id first, which is
  // exactly the order of better(). Consumes the counts of [idx, hi_].
  uint32_t* h = hist_.data();
  uint32_t m = 0;
  for (int32_t i = hi_; i >= idx; --i) {
    const uint32_t c = h[i];
    h[i] = m;
    m += c;
  }
  cand_.resize(m);  // within reserve: no allocation
  cum_.resize(m);
  const float* table = half_table();
  const double* w = wtab_.data();
  const int16_t tk = static_cast<int16_t>(idx - kIndexBias);
  for_each_at_least(parts, n_parts, tk, [&](int16_t key, uint16_t raw, int32_t id) {
    const uint32_t pos = h[key + kIndexBias]++;
    cand_[pos] = {table[raw], id};
    cum_[pos] = w[key + kIndexBias];
  });
}

double Sampler::fill_weights(float vmax, double inv_t) {
  // w(v) = exp((v - vmax) / T) for each occupied fp16 value. Within one binade
  // the values are evenly spaced by delta, so w = w(anchor) * exp(delta/T)^j with
  // an exact exp at every 128th value: ~16x fewer exp calls, relative error
  // ~1e-14 (exp per value where the ratio could overflow or the anchor underflow).
  const float* table = half_table();
  const uint32_t* h = hist_.data();
  double* w = wtab_.data();
  const int32_t stop = std::max(lo_, kNegInfIndex + 1);
  const double vm = static_cast<double>(vmax);
  auto exact = [&](int32_t idx) {
    return std::exp((static_cast<double>(index_value(table, idx)) - vm) * inv_t);
  };
  double z = 0.0;
  int32_t group = -1, anchor = -1;
  bool steady = false;
  double wa = 0.0;
  for (int32_t idx = stop; idx <= hi_; ++idx) {  // ascending: small terms first
    if (!h[idx]) continue;
    if ((idx >> 10) != group) {
      group = idx >> 10;
      const int32_t base = group << 10;
      const double step = (static_cast<double>(index_value(table, base + 1)) -
                           static_cast<double>(index_value(table, base))) * inv_t;
      steady = step * 128.0 <= 50.0;
      if (steady) {
        const double r = std::exp(step);
        rpow_[0] = 1.0;
        for (int j = 1; j < 128; ++j) rpow_[j] = rpow_[j - 1] * r;
      }
      anchor = -1;
    }
    double wi;
    if (steady) {
      const int32_t a = idx & ~127;
      if (a != anchor) {
        anchor = a;
        wa = exact(a);
      }
      wi = wa > 1e-290 ? wa * rpow_[idx - a] : exact(idx);
    } else {
      wi = exact(idx);
    }
    w[idx] = wi;
    z += static_cast<double>(h[idx]) * wi;
  }
  return z;
}

int Sampler::vocab_pick(const LogitsPart* parts, int n_parts, int32_t* token) {
  // No top-k: softmax masses per distinct fp16 value, so that neither a sort of
  // the vocabulary nor an exp per token is needed.
  const float ninf = -std::numeric_limits<float>::infinity();
  const double inv_t = 1.0 / static_cast<double>(cfg_.temperature);
  const float* table = half_table();
  build_histogram(parts, n_parts);
  const int32_t stop = std::max(lo_, kNegInfIndex + 1);
  float vmax = hi_ >= stop ? index_value(table, hi_) : ninf;
  ovs_.clear();
  for (const Candidate& o : over_)
    if (o.v > ninf) {
      ovs_.push_back(o);
      vmax = std::max(vmax, o.v);
    }
  if (vmax == ninf) {
    clear_histogram();
    error_ = "no token left to sample: every logit is -inf or NaN after the token mask, logit_bias and penalties";
    return -1;
  }
  auto weight = [&](float v) {
    return std::exp((static_cast<double>(v) - static_cast<double>(vmax)) * inv_t);
  };
  double z = fill_weights(vmax, inv_t);
  for (const Candidate& o : ovs_) z += weight(o.v);
  const uint32_t* h = hist_.data();
  const double* w = wtab_.data();

  cand_.clear();
  cum_.clear();
  if (cfg_.top_p < 1.0f) {
    // Walk values from the best down (overrides merged in) until the mass reaches
    // top_p; gather everything at or above that value (a superset of the nucleus,
    // ties included) already in order, and let draw() cut it exactly.
    std::sort(ovs_.begin(), ovs_.end(), better);
    const double target = static_cast<double>(cfg_.top_p) * z;
    double acc = 0.0;
    size_t j = 0;
    int32_t kb = stop;
    float vthr = ninf;
    for (int32_t idx = hi_; idx >= stop; --idx) {
      if (!h[idx] && (j == ovs_.size())) continue;
      const float v = index_value(table, idx);
      while (j < ovs_.size() && ovs_[j].v >= v) acc += weight(ovs_[j++].v);
      acc += static_cast<double>(h[idx]) * w[idx];
      if (acc >= target) {
        kb = idx;
        vthr = v;
        break;
      }
    }
    if (hi_ >= stop) gather_sorted(parts, n_parts, kb);
    clear_histogram();
    // Merge the overrides that reach the threshold, from the back (no buffer).
    size_t r = 0;
    while (r < ovs_.size() && ovs_[r].v >= vthr) ++r;
    size_t i = cand_.size(), k = cand_.size() + r;
    cand_.resize(k);
    cum_.resize(k);
    while (r > 0) {
      --k;
      if (i > 0 && better(ovs_[r - 1], cand_[i - 1])) {
        --i;
        cand_[k] = cand_[i];
        cum_[k] = cum_[i];
      } else {
        --r;
        cand_[k] = ovs_[r];
        cum_[k] = weight(ovs_[r].v);
      }
    }
    return draw(vmax, inv_t, z, true, token);
  }
  if (cfg_.min_p > 0.0f) {
    // Only values with weight >= min_p survive; gathered in id order, overrides
    // last (the order in which the draw walks them).
    // The cut is relative to the best value's weight (not to the previous value:
    // neighbouring fp16 values are always within reach of each other, so that
    // would gather the whole vocabulary). The best value always stays (its weight,
    // rounded, may fall just under 1: min_p = 1 must keep the top token). An
    // override better than every logit only raises draw()'s exact cut, so this
    // gathers a superset of what survives.
    const double min_w = static_cast<double>(cfg_.min_p);
    int32_t kb = -1;
    double w_top = 0.0;
    for (int32_t idx = hi_; idx >= stop; --idx) {
      if (!h[idx]) continue;
      if (kb < 0) {
        w_top = w[idx];
      } else if (w[idx] < min_w * w_top) {
        break;
      }
      kb = idx;
    }
    if (kb >= 0) gather_at_least(parts, n_parts, kb);
    clear_histogram();
    for (const Candidate& o : over_)
      if (o.v > ninf) {
        cand_.push_back(o);
        cum_.push_back(weight(o.v));
      }
    return draw(vmax, inv_t, -1.0, true, token);
  }
  // Plain temperature: one draw against the total, walking the tokens in id
  // order (then the overrides) with weights looked up per value.
  const double u = uniform01(rng_) * z;
  double acc = 0.0;
  int32_t pick = -1;
  bool done = false;
  for (int p = 0; p < n_parts && !done; ++p) {
    const uint16_t* d = parts[p].data;
    for (int64_t i = 0; i < parts[p].size; ++i) {
      const int16_t key = canon_key(d[i]);
      if (key <= kKeyNegInf) continue;
      const double wi = w[key + kIndexBias];
      if (wi <= 0.0) continue;
      acc += wi;
      pick = static_cast<int32_t>(parts[p].offset + i);
      if (u < acc) {
        done = true;
        break;
      }
    }
  }
  for (size_t i = 0; i < over_.size() && !done; ++i) {
    if (!(over_[i].v > ninf)) continue;
    const double wi = weight(over_[i].v);
    if (wi <= 0.0) continue;
    acc += wi;
    pick = over_[i].id;
    done = u < acc;
  }
  clear_histogram();
  *token = pick;
  return 0;
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
  if (!use_k) return vocab_pick(parts, n_parts, token);
  if (cfg_.top_k > kHeapMaxK) {
    top_by_histogram(parts, n_parts, cfg_.top_k);
  } else {
    // cand_ doubles as the heap scratch of top_by_key: fill it only afterwards.
    cand_.resize(static_cast<size_t>(cfg_.top_k));  // within reserve: no allocation
    top_by_key(parts, n_parts, cfg_.top_k);
    cand_.clear();
    for (const Candidate& c : heap_) cand_.push_back(c);
  }
  for (const Candidate& o : over_)
    if (o.v > ninf) cand_.push_back(o);
  if (cand_.size() > static_cast<size_t>(cfg_.top_k)) {
    std::nth_element(cand_.begin(), cand_.begin() + cfg_.top_k, cand_.end(), better);
    cand_.resize(static_cast<size_t>(cfg_.top_k));
  }
  if (cand_.empty()) {
    error_ = "no token left to sample: every logit is -inf or NaN after the token mask, logit_bias and penalties";
    return -1;
  }
  const double inv_t = 1.0 / static_cast<double>(cfg_.temperature);
  float vmax = ninf;
  for (const Candidate& c : cand_) vmax = std::max(vmax, c.v);
  if (cfg_.top_p < 1.0f) std::sort(cand_.begin(), cand_.end(), better);
  return draw(vmax, inv_t, -1.0, false, token);
}

int Sampler::draw(float vmax, double inv_t, double z_all, bool weighted, int32_t* token) {
  // cand_: the candidates (best first when top-p is on); z_all >= 0: the mass of
  // every candidate when cand_ holds only a head of them.
  const bool use_p = cfg_.top_p < 1.0f;
  double z = 0.0;
  if (weighted) {
    for (double w : cum_) z += w;
  } else {
    cum_.clear();
    for (const Candidate& c : cand_) {
      const double w = std::exp((static_cast<double>(c.v) - static_cast<double>(vmax)) * inv_t);
      z += w;
      cum_.push_back(w);
    }
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
  // min-p relative to the best kept weight (about 1 after subtracting vmax, but
  // not exactly: comparing with 1 would drop every token at min_p = 1).
  double wbest = 0.0;
  for (size_t i = 0; i < keep; ++i) wbest = std::max(wbest, cum_[i]);
  const double min_w = static_cast<double>(cfg_.min_p) * wbest;
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
  if (pick < 0) {
    error_ = "no token left to sample after top-p and min-p";
    return -1;
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
  // 0. The token mask: forbidden tokens read -inf for everything below.
  if (mask_) apply_token_mask(parts, n_parts);
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
      error_ = "no token left to choose: every logit is -inf or NaN after the token mask, logit_bias and penalties";
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
  if (mask_) restore_token_mask(parts, n_parts);
  if (rc == 0 && cfg_.top_logprobs >= 0) compute_logprobs(parts, n_parts, *token);
  return rc;
}

}  // namespace anemll
