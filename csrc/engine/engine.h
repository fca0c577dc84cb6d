// The generation pipeline: embeddings -> N FFN chunks -> LM head -> sampler,
// run through a backend (backends/backend_abi.h) on buffers allocated and
// bound once. Methods return a Status and leave the message in error(); no
// exception escapes and nothing here touches Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backends/backend_abi.h"
#include "engine/sampler.h"

namespace anemll {

struct TensorDesc {
  std::string name;
  int32_t dtype = 0;
  std::vector<std::vector<int64_t>> shapes;  // declared shape first, then enumerated ones
};

struct ComponentDesc {
  std::string label;     // e.g. "ffn_infer[1]", used in messages
  std::string path;      // model file
  std::string function;  // "" = the file's default function
  std::vector<TensorDesc> inputs, outputs, states;
};

// The FFN functions of one smaller context size (ANEMLL's infer_ctx{N}/prefill_ctx{N}); the pipeline's own
// ffn_* vectors serve its full context_length.
struct ContextFunctions {
  int64_t context_length = 0;
  std::vector<ComponentDesc> ffn_prefill, ffn_infer, ffn_infer_rotate;
};

struct PipelineDesc {
  int64_t batch_size = 0, context_length = 0, hidden_size = 0, vocab_size = 0;
  ComponentDesc embeddings;  // unused by monolithic models
  std::vector<ComponentDesc> ffn_prefill, ffn_infer;
  // Sliding-window models (Gemma 3): the infer functions that shift the local
  // cache, called for positions >= sliding_window; one per chunk.
  std::vector<ComponentDesc> ffn_infer_rotate;
  int64_t sliding_window = 0;  // 0: no sliding-window cache
  // One file holding embeddings, layers and head: ffn_infer[0] takes input_ids
  // and returns the head outputs (logits parts or argmax); no embeddings/lm_head.
  bool monolithic = false;
  ComponentDesc lm_head;  // unused by monolithic models
  // Context switching: functions for smaller contexts, ascending; each has its own states, and the cache moves
  // to the next size (backend copy_state) when positions outgrow the current one.
  std::vector<ContextFunctions> smaller_contexts;
  std::vector<std::string> logits_outputs;  // in vocabulary order; empty for argmax heads
  std::vector<int64_t> part_sizes;          // argmax heads: vocabulary entries per part
  bool sequential_prefill = false;          // feed prompts one token at a time through infer
  // Ids the tokenizer knows: [0, valid_vocab). 0 = all of vocab_size. Ids past it
  // (padding rows of the LM head, e.g. Qwen3's 151,936 vs 151,669) are never
  // sampled nor accepted as input.
  int64_t valid_vocab = 0;
};

enum Status : int { kOk = 0, kInvalidArgument = 1, kConfigError = 2, kBackendError = 3 };

// One tensor of one KV-cache state, as the FFN chunks declare it.
struct StateTensor {
  int64_t state = 0;  // index of the state object (chunks may share one)
  std::string name;
  int32_t dtype = 0;
  std::vector<int64_t> shape;
  size_t nbytes = 0;
};

struct Buffer {
  void* data = nullptr;
  size_t nbytes = 0;
};

// Where the time of decode steps went, in nanoseconds of a monotonic clock, summed over the steps timed
// since the last reset. `chunk_ns` is sized once (one entry per FFN chunk) so a timed step never allocates;
// the host work (the engine's own time between the parts) is total_ns minus the rest.
struct StepTiming {
  int64_t steps = 0;
  int64_t total_ns = 0, embed_ns = 0, head_ns = 0, sample_ns = 0;
  std::vector<int64_t> chunk_ns;
};

// Nanoseconds of a monotonic clock (std::chrono::steady_clock).
int64_t monotonic_ns();

class Engine {
 public:
  explicit Engine(const anemll_backend* backend) : be_(backend) {}
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  int init(const PipelineDesc& desc);
  int reset();  // zero the KV cache: a new conversation
  // Writes the KV cache for tokens at positions start .. start+n-1 (start <= length()).
  int prefill(const int32_t* tokens, int64_t n, int64_t start);
  // As prefill, but one token at a time through infer, as decode steps feed
  // them: rebuilds a generation's cache with the very numerics it had.
  int replay(const int32_t* tokens, int64_t n, int64_t start);
  // Feeds `token` at `pos` (pos <= length()) and samples the next token.
  int step(int32_t token, int64_t pos, int32_t* next);
  int configure_sampler(const SamplerConfig& cfg);
  std::string sampler_rng_state() const { return sampler_.rng_state(); }
  int set_sampler_rng_state(const std::string& state) {
    return sampler_.set_rng_state(state) ? kOk : fail(kInvalidArgument, "sampler: invalid RNG state");
  }
  // The sampler's per-step token mask (see Sampler::set_token_mask); nullptr clears it.
  int set_token_mask(const uint32_t* words, int64_t n_bits);
  // KV-cache save and restore: copy state tensor i (of state_tensors()) out or in,
  // dense, exactly its nbytes. write_state empties the history (length 0) until
  // set_history says which tokens the restored cache holds.
  bool can_access_states() const;
  int read_state(size_t i, void* dst, size_t nbytes);
  int write_state(size_t i, const void* src, size_t nbytes);
  int set_history(const int32_t* tokens, int64_t n);
  // Models with functions per context size: which size's states hold the restored cache (as
  // active_context() reported when it was saved); the other sizes' states are not read until a switch.
  int set_active_context(int64_t ctx);
  const std::vector<StateTensor>& state_tensors() const { return state_tensors_; }

  const std::string& error() const { return error_; }
  int64_t length() const { return length_; }
  int64_t valid_vocab() const { return valid_; }
  const int32_t* history() const { return history_.data(); }
  const Sampler& sampler() const { return sampler_; }
  bool argmax_head() const { return argmax_head_; }
  int n_parts() const { return static_cast<int>(parts_.size()); }
  const LogitsPart* parts() const { return parts_.data(); }
  // Logits in backend memory are readable only between these (no-ops otherwise;
  // the sampler's reads are bracketed inside step()).
  int map_logits();
  void unmap_logits();
  int64_t backend_buffers() const { return static_cast<int64_t>(bufs_.size()); }
  const std::string& prefill_mode() const { return prefill_mode_; }
  int64_t state_count() const { return static_cast<int64_t>(states_.size()); }
  // Which function a single token at `pos` runs through: "infer" or "infer_rotate".
  const char* infer_function(int64_t pos) const { return rotates_at(pos) ? "infer_rotate" : "infer"; }
  // Whether a prefill batch may start at `pos` (exact for the model's caches).
  bool batch_prefill_at(int64_t pos) const;
  // Counters of backend predictions, for tests and benchmarks.
  int64_t embed_calls = 0, prefill_calls = 0, infer_calls = 0, head_calls = 0;
  int64_t infer_rotate_calls = 0, cache_rebuilds = 0, context_switches = 0;
  // Per-part timing of decode steps (off by default: its clock reads are measured by `anemll-fast bench`).
  void set_timing(bool on) { timing_on_ = on; }
  bool timing() const { return timing_on_; }
  const StepTiming& timing_counters() const { return timing_; }
  void reset_timing();
  // The context size whose functions serve `pos` now, and the largest size in use.
  int64_t context_at(int64_t pos) const;
  int64_t active_context() const { return levels_.empty() ? 0 : levels_[lvl_].ctx; }

 private:
  struct Binding {
    anemll_binding* handle = nullptr;
    anemll_model* model = nullptr;
    anemll_state* state = nullptr;
    std::string label;
  };
  // The functions of one context size, with the mask buffers of its width and its own states.
  struct Level {
    int64_t ctx = 0;
    uint16_t *mask_d = nullptr, *mask_p = nullptr, *upd_d = nullptr, *upd_p = nullptr;
    int64_t upd_d_last = -1;
    std::vector<Binding> infer, prefill, infer_rot;
    std::vector<anemll_state*> states;  // one per state set, in the order of `sets`
    std::vector<std::vector<std::string>> sets;
  };

  // Memory the backend provides (backend_abi.h alloc_buffer), bound as is.
  struct BackendBuffer {
    anemll_buffer* handle = nullptr;
    void* data = nullptr;  // the binding key
    std::vector<int64_t> shape, strides;
    size_t nbytes = 0;
    // Logits: the contiguous rows, with their first vocabulary id, as parts.
    int first_part = -1, n_rows = 0;
    std::vector<int64_t> row_offsets;  // elements from the mapped base
  };

  int fail(int status, std::string msg);
  Buffer* alloc(size_t nbytes);
  // Backend memory for a tensor of `shape` (nullptr: use alloc()).
  BackendBuffer* backend_alloc(const char* name, int32_t dtype, const std::vector<int64_t>& shape);
  const BackendBuffer* backend_buffer_at(const void* data) const;
  int load(const ComponentDesc& c, anemll_model** out);
  int bind(Binding* b, const ComponentDesc& c, anemll_model* m, anemll_state* st,
           const std::vector<std::pair<std::string, const void*>>& in_names, std::vector<anemll_tensor>& ins,
           std::vector<anemll_tensor>& outs);
  int predict(Binding& b);
  int feed(const int32_t* tokens, int64_t n, int64_t start, bool one_by_one);
  int check_state_io(size_t i, size_t nbytes, const char* verb);
  // One token through the embeddings and `chunks` (infer_ or prefill_ of a sequential model).
  int run_one_token(int32_t token, int64_t pos, std::vector<Binding>& chunks, int64_t& calls);
  int run_infer(int32_t token, int64_t pos);  // embeddings + chunks, hidden left in hid_d_
  int run_prefill_batch(const int32_t* tokens, int64_t count, int64_t pos);
  int run_prefill_single(int32_t token, int64_t pos);
  int run_head_and_sample(int64_t pos, int32_t* next);
  int choose_token(int64_t pos, int32_t* next);  // argmax head or sampler over the head's outputs
  void set_positions_decode(int64_t pos);
  int make_states(const std::vector<const ComponentDesc*>& comps, const std::vector<anemll_model*>& models,
                  std::vector<anemll_state*>& out, Level& level);
  // Makes level `i` current for positions < end: moves the cache up to the smallest size holding them.
  int use_context_for(int64_t end);
  int switch_context(size_t target);
  // Writes positions start .. start+n-1 (start <= length_), each exactly once.
  int run_positions(const int32_t* tokens, int64_t n, int64_t start, bool one_by_one);
  // Makes the cache valid for positions < pos before rewriting from pos: a
  // rotated sliding-window cache cannot be rewound, so it is rebuilt from history.
  int rewind_to(int64_t pos);
  bool rotates_at(int64_t pos) const { return W_ > 0 && pos >= W_; }

  const anemll_backend* be_;
  std::string error_;
  int64_t B_ = 0, ctx_ = 0, H_ = 0, V_ = 0;
  int64_t valid_ = 0;  // ids >= valid_ are masked (see PipelineDesc::valid_vocab)
  int n_chunks_ = 0;
  int64_t S_prefill_ = 0;  // seq len of the prefill function (B or 1), 0 = unused
  int64_t W_ = 0;          // sliding window, 0 = none
  bool mono_ = false;
  std::string prefill_mode_;
  bool argmax_head_ = false;
  bool emb_decode_padded_ = false;
  int64_t length_ = 0;
  std::vector<int32_t> history_;

  std::vector<Buffer> buffers_;
  std::vector<anemll_model*> models_;
  std::vector<anemll_state*> states_;
  std::vector<StateTensor> state_tensors_;
  std::vector<anemll_binding*> bindings_;
  std::vector<BackendBuffer> bufs_;  // reserved once: pointers into it stay valid
  std::vector<int> logits_bufs_;     // indices into bufs_
  bool logits_mapped_ = false;

  // Shared buffers (pointers into buffers_).
  int32_t *ids_d_ = nullptr, *ids_p_ = nullptr;
  uint16_t* hid_d_[2] = {nullptr, nullptr};
  uint16_t* hid_p_[2] = {nullptr, nullptr};
  int32_t *pos_d_ = nullptr, *cur_d_ = nullptr, *pos_p_ = nullptr, *cur_p_ = nullptr;
  uint16_t* mask_full_ = nullptr;

  Binding emb_d_, emb_p_, head_;
  std::vector<Level> levels_;  // ascending context sizes; the last is context_length
  int lvl_ = 0;
  std::vector<LogitsPart> parts_;
  // parts_ cut at valid_: what the sampler reads, so the mask costs nothing per step.
  std::vector<LogitsPart> sample_parts_;
  int32_t* amax_idx_ = nullptr;
  void* amax_val_ = nullptr;
  int32_t amax_val_dtype_ = 0;
  std::vector<int64_t> part_offsets_, part_sizes_;
  Sampler sampler_;
  bool timing_on_ = false;
  bool timing_step_ = false;  // inside a timed step(): the parts read the clock
  StepTiming timing_;
};

}  // namespace anemll
