#include "engine/engine.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "engine/fp16.h"

namespace anemll {
namespace {

// Buffers are page-aligned: Core ML binds them as MLMultiArrays and outputs
// (MLPredictionOptions.h: "use page-aligned address"; 16 KiB pages on Apple
// silicon). Never less than a cache line.
size_t buffer_alignment() {
  static const size_t align = [] {
    const long page = sysconf(_SC_PAGESIZE);
    return page >= 64 ? static_cast<size_t>(page) : size_t{64};
  }();
  return align;
}
constexpr uint16_t kHalfZero = 0x0000u, kHalfOne = 0x3C00u;

// What the engine feeds to (or expects from) one named tensor.
struct Slot {
  std::string name;
  void* data;
  int32_t dtype;
  int64_t count;  // element count the engine's buffer holds
  bool required;
};

int64_t product(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

anemll_tensor make_tensor(const TensorDesc& t, const std::vector<int64_t>& shape, void* data) {
  anemll_tensor out{};
  out.name = t.name.c_str();
  out.dtype = t.dtype;
  out.rank = static_cast<int32_t>(shape.size());
  int64_t stride = 1;
  for (int i = out.rank - 1; i >= 0; --i) {
    out.shape[i] = shape[static_cast<size_t>(i)];
    out.strides[i] = stride;
    stride *= shape[static_cast<size_t>(i)];
  }
  out.data = data;
  out.nbytes = static_cast<size_t>(stride) * anemll_dtype_size(t.dtype);
  return out;
}

const TensorDesc* find(const std::vector<TensorDesc>& v, const std::string& name) {
  for (const auto& t : v)
    if (t.name == name) return &t;
  return nullptr;
}

std::string hidden_output_name(const ComponentDesc& c, const char* preferred) {
  if (find(c.outputs, preferred)) return preferred;
  if (c.outputs.size() == 1) return c.outputs[0].name;
  return "";
}

bool same_states(const ComponentDesc& a, const ComponentDesc& b) {
  if (a.states.size() != b.states.size()) return false;
  for (const auto& s : a.states) {
    const TensorDesc* o = find(b.states, s.name);
    if (!o || o->dtype != s.dtype || o->shapes.front() != s.shapes.front()) return false;
  }
  return true;
}

}  // namespace

Engine::~Engine() {
  unmap_logits();
  for (anemll_binding* b : bindings_) be_->free_binding(be_->ctx, b);
  for (anemll_state* s : states_) be_->free_state(be_->ctx, s);
  for (anemll_model* m : models_) be_->free_model(be_->ctx, m);
  for (BackendBuffer& b : bufs_) be_->free_buffer(be_->ctx, b.handle);
  for (Buffer& b : buffers_) std::free(b.data);
}

Engine::BackendBuffer* Engine::backend_alloc(const char* name, int32_t dtype, const std::vector<int64_t>& shape) {
  if (!anemll_backend_has_buffers(be_) || shape.empty() || shape.size() > ANEMLL_MAX_RANK ||
      bufs_.size() == bufs_.capacity())
    return nullptr;
  anemll_tensor t{};
  t.name = name;
  t.dtype = dtype;
  t.rank = static_cast<int32_t>(shape.size());
  for (int32_t i = 0; i < t.rank; ++i) t.shape[i] = shape[static_cast<size_t>(i)];
  anemll_buffer* h = nullptr;
  // A backend that declines (or fails) leaves the tensor in the engine's own memory.
  if (be_->alloc_buffer(be_->ctx, &t, &h) != ANEMLL_OK || !h) return nullptr;
  int64_t last = 0;
  bool sound = t.data != nullptr && t.strides[t.rank - 1] == 1;
  for (int32_t i = 0; sound && i < t.rank; ++i) {
    sound = t.strides[i] >= 0;
    last += (t.shape[i] - 1) * t.strides[i];
  }
  if (!sound || static_cast<uint64_t>(last + 1) * anemll_dtype_size(dtype) > t.nbytes) {
    be_->free_buffer(be_->ctx, h);
    return nullptr;
  }
  BackendBuffer b;
  b.handle = h;
  b.data = t.data;
  b.shape = shape;
  b.strides.assign(t.strides, t.strides + t.rank);
  b.nbytes = t.nbytes;
  bufs_.push_back(std::move(b));
  return &bufs_.back();
}

const Engine::BackendBuffer* Engine::backend_buffer_at(const void* data) const {
  for (const BackendBuffer& b : bufs_)
    if (b.data == data) return &b;
  return nullptr;
}

int Engine::map_logits() {
  if (logits_mapped_) return kOk;
  for (size_t k = 0; k < logits_bufs_.size(); ++k) {
    BackendBuffer& b = bufs_[static_cast<size_t>(logits_bufs_[k])];
    void* base = nullptr;
    if (be_->map_buffer(be_->ctx, b.handle, &base) != ANEMLL_OK || !base) {
      for (size_t j = 0; j < k; ++j) be_->unmap_buffer(be_->ctx, bufs_[static_cast<size_t>(logits_bufs_[j])].handle);
      return fail(kBackendError, std::string("lm_head: cannot map a logits buffer: ") + be_->last_error(be_->ctx));
    }
    for (int r = 0; r < b.n_rows; ++r)
      parts_[static_cast<size_t>(b.first_part + r)].data = static_cast<uint16_t*>(base) + b.row_offsets[static_cast<size_t>(r)];
  }
  // sample_parts_ is parts_ cut at the tokenizer's size: a prefix, re-pointed with it.
  for (size_t i = 0; i < sample_parts_.size(); ++i) sample_parts_[i].data = parts_[i].data;
  logits_mapped_ = true;
  return kOk;
}

void Engine::unmap_logits() {
  if (!logits_mapped_) return;
  for (int i : logits_bufs_) be_->unmap_buffer(be_->ctx, bufs_[static_cast<size_t>(i)].handle);
  logits_mapped_ = false;
}

int Engine::fail(int status, std::string msg) {
  error_ = std::move(msg);
  return status;
}

Buffer* Engine::alloc(size_t nbytes) {
  Buffer b;
  b.nbytes = nbytes;
  const size_t align = buffer_alignment();
  const size_t rounded = (std::max<size_t>(nbytes, 1) + align - 1) / align * align;
  if (posix_memalign(&b.data, align, rounded) != 0) return nullptr;
  std::memset(b.data, 0, rounded);
  buffers_.push_back(b);
  return &buffers_.back();
}

int Engine::load(const ComponentDesc& c, anemll_model** out) {
  *out = nullptr;
  const char* fn = c.function.empty() ? nullptr : c.function.c_str();
  if (be_->load(be_->ctx, c.path.c_str(), fn, out) != ANEMLL_OK || !*out)
    return fail(kBackendError, c.label + ": cannot load " + c.path + (fn ? std::string(" function ") + fn : "") +
                                   ": " + be_->last_error(be_->ctx));
  models_.push_back(*out);
  return kOk;
}

int Engine::predict(Binding& b) {
  if (be_->predict(be_->ctx, b.handle, b.state) != ANEMLL_OK)
    return fail(kBackendError, b.label + ": prediction failed: " + be_->last_error(be_->ctx));
  return kOk;
}

int Engine::init(const PipelineDesc& d) {
  buffers_.reserve(64);  // pointers into buffers_ and bufs_ must stay valid
  bufs_.reserve(64);
  B_ = d.batch_size;
  ctx_ = d.context_length;
  H_ = d.hidden_size;
  V_ = d.vocab_size;
  n_chunks_ = static_cast<int>(d.ffn_infer.size());
  if (B_ <= 0 || ctx_ <= 0 || H_ <= 0 || V_ <= 0)
    return fail(kConfigError, "shapes: batch_size, context_length, hidden_size and vocab_size must be positive");
  if (n_chunks_ == 0) return fail(kConfigError, "components.ffn_infer: no FFN chunk");
  if (!d.ffn_prefill.empty() && d.ffn_prefill.size() != d.ffn_infer.size())
    return fail(kConfigError, "components.ffn_prefill: chunk count differs from components.ffn_infer");
  if (B_ > ctx_) return fail(kConfigError, "shapes.batch_size: larger than context_length");
  valid_ = d.valid_vocab == 0 ? V_ : d.valid_vocab;
  if (valid_ < 1 || valid_ > V_)
    return fail(kConfigError, "valid_vocab: " + std::to_string(d.valid_vocab) + " is not in [1, vocab_size " +
                                  std::to_string(V_) + "]");

  // Shared buffers.
  auto i32 = [&](int64_t n) { Buffer* b = alloc(static_cast<size_t>(n) * 4); return b ? static_cast<int32_t*>(b->data) : nullptr; };
  auto f16 = [&](int64_t n) { Buffer* b = alloc(static_cast<size_t>(n) * 2); return b ? static_cast<uint16_t*>(b->data) : nullptr; };
  ids_d_ = i32(B_);  // B entries: the decode embeddings may need the padded batch shape
  ids_p_ = i32(B_);
  hid_d_[0] = f16(B_ * H_);
  hid_d_[1] = f16(H_);
  hid_p_[0] = f16(B_ * H_);
  hid_p_[1] = f16(B_ * H_);
  pos_d_ = i32(1);
  cur_d_ = i32(1);
  pos_p_ = i32(B_);
  cur_p_ = i32(1);
  mask_full_ = f16(ctx_ * ctx_);
  mask_d_ = f16(ctx_);
  mask_p_ = f16(B_ * ctx_);
  upd_d_ = f16(ctx_);
  upd_p_ = f16(ctx_ * B_);
  if (!mask_p_ || !upd_p_) return fail(kConfigError, "out of memory allocating engine buffers");
  history_.assign(static_cast<size_t>(ctx_), 0);
  // The causal mask, once for the whole context: row i sees columns <= i.
  for (int64_t r = 0; r < ctx_; ++r)
    for (int64_t c = 0; c < ctx_; ++c) mask_full_[r * ctx_ + c] = c <= r ? kHalfZero : kHalfNegInf;

  // Models.
  anemll_model* emb_m;
  if (int rc = load(d.embeddings, &emb_m)) return rc;
  std::vector<anemll_model*> inf_m(n_chunks_), pre_m(d.ffn_prefill.size());
  for (int c = 0; c < n_chunks_; ++c)
    if (int rc = load(d.ffn_infer[c], &inf_m[c])) return rc;
  for (size_t c = 0; c < d.ffn_prefill.size(); ++c)
    if (int rc = load(d.ffn_prefill[c], &pre_m[c])) return rc;
  anemll_model* head_m;
  if (int rc = load(d.lm_head, &head_m)) return rc;

  // States: one shared when every FFN function declares the same specs, else one per chunk.
  std::vector<anemll_state*> chunk_state(n_chunks_, nullptr);
  bool all_same = true;
  for (int c = 0; c < n_chunks_; ++c) {
    all_same = all_same && same_states(d.ffn_infer[0], d.ffn_infer[c]);
    if (!d.ffn_prefill.empty()) all_same = all_same && same_states(d.ffn_infer[0], d.ffn_prefill[c]);
  }
  auto make_state = [&](int c, anemll_state** out) -> int {
    *out = nullptr;
    if (d.ffn_infer[c].states.empty()) return kOk;
    if (be_->make_state(be_->ctx, inf_m[c], out) != ANEMLL_OK || !*out)
      return fail(kBackendError, d.ffn_infer[c].label + ": cannot make state: " + be_->last_error(be_->ctx));
    states_.push_back(*out);
    return kOk;
  };
  if (all_same) {
    anemll_state* s;
    if (int rc = make_state(0, &s)) return rc;
    std::fill(chunk_state.begin(), chunk_state.end(), s);
  } else {
    for (int c = 0; c < n_chunks_; ++c) {
      if (!d.ffn_prefill.empty() && !same_states(d.ffn_infer[c], d.ffn_prefill[c]))
        return fail(kConfigError, "components." + d.ffn_prefill[c].label + ".states: differ from components." +
                                      d.ffn_infer[c].label + ".states, so they cannot share a KV cache");
      if (int rc = make_state(c, &chunk_state[c])) return rc;
    }
  }

  // A tensor over backend memory takes that memory's layout: its strides when
  // the shapes agree, dense ones when a single row is all there is.
  auto use_buffer_layout = [&](anemll_tensor& t, const std::string& where) -> int {
    const BackendBuffer* bb = backend_buffer_at(t.data);
    if (!bb) return kOk;
    t.nbytes = bb->nbytes;
    const std::vector<int64_t> shape(t.shape, t.shape + t.rank);
    if (shape == bb->shape) {
      for (int32_t i = 0; i < t.rank; ++i) t.strides[i] = bb->strides[static_cast<size_t>(i)];
      return kOk;
    }
    if (t.rank >= 1 && product(shape) == t.shape[t.rank - 1] && t.shape[t.rank - 1] == bb->shape.back()) return kOk;
    return fail(kConfigError, where + ".shape: " + shape_str(shape) + " cannot view the backend buffer of shape " +
                                  shape_str(bb->shape) + " it shares");
  };

  // Binding helper: match declared tensors to engine slots, checking dtype and size.
  auto bind = [&](Binding& b, const ComponentDesc& c, anemll_model* m, anemll_state* st,
                  const std::vector<Slot>& in_slots, const std::vector<Slot>& out_slots) -> int {
    b.model = m;
    b.state = st;
    b.label = c.label;
    std::vector<anemll_tensor> ins, outs;
    const std::string where = "components." + c.label;
    for (const Slot& s : in_slots) {
      if (s.required && !find(c.inputs, s.name))
        return fail(kConfigError, where + ".inputs." + s.name + ": missing input the engine must feed");
    }
    for (const TensorDesc& t : c.inputs) {
      const Slot* s = nullptr;
      for (const Slot& x : in_slots)
        if (x.name == t.name) s = &x;
      if (!s)
        return fail(kConfigError, where + ".inputs." + t.name + ": unknown input (the engine feeds " +
                                      [&] { std::string n; for (auto& x : in_slots) n += (n.empty() ? "" : ", ") + x.name; return n; }() + ")");
      if (t.dtype != s->dtype)
        return fail(kConfigError, where + ".inputs." + t.name + ".data_type: " + anemll_dtype_name(t.dtype) +
                                      ", the engine feeds " + anemll_dtype_name(s->dtype));
      const std::vector<int64_t>* shape = nullptr;
      for (const auto& sh : t.shapes)
        if (product(sh) == s->count) { shape = &sh; break; }
      if (!shape)
        return fail(kConfigError, where + ".inputs." + t.name + ".shape: " + shape_str(t.shapes.front()) +
                                      " does not hold the " + std::to_string(s->count) + " elements the engine feeds");
      ins.push_back(make_tensor(t, *shape, s->data));
      if (int rc = use_buffer_layout(ins.back(), where + ".inputs." + t.name)) return rc;
    }
    for (const Slot& s : out_slots)
      if (s.required && !find(c.outputs, s.name))
        return fail(kConfigError, where + ".outputs." + s.name + ": missing output");
    for (const TensorDesc& t : c.outputs) {
      const Slot* s = nullptr;
      for (const Slot& x : out_slots)
        if (x.name == t.name) s = &x;
      const std::vector<int64_t>& declared = t.shapes.front();
      if (!s) {  // an output the engine does not read: give it a scratch buffer
        if (anemll_dtype_size(t.dtype) == 0)
          return fail(kConfigError, where + ".outputs." + t.name + ".data_type: unknown");
        Buffer* sb = alloc(static_cast<size_t>(product(declared)) * anemll_dtype_size(t.dtype));
        if (!sb) return fail(kConfigError, "out of memory");
        outs.push_back(make_tensor(t, declared, sb->data));
        continue;
      }
      if (t.dtype != s->dtype)
        return fail(kConfigError, where + ".outputs." + t.name + ".data_type: " + anemll_dtype_name(t.dtype) +
                                      ", the engine expects " + anemll_dtype_name(s->dtype));
      if (product(declared) != s->count)
        return fail(kConfigError, where + ".outputs." + t.name + ".shape: " + shape_str(declared) + " holds " +
                                      std::to_string(product(declared)) + " elements, the engine expects " +
                                      std::to_string(s->count));
      outs.push_back(make_tensor(t, declared, s->data));
      if (int rc = use_buffer_layout(outs.back(), where + ".outputs." + t.name)) return rc;
    }
    if (be_->bind(be_->ctx, m, ins.data(), static_cast<int32_t>(ins.size()), outs.data(),
                  static_cast<int32_t>(outs.size()), &b.handle) != ANEMLL_OK || !b.handle)
      return fail(kBackendError, c.label + ": cannot bind buffers: " + be_->last_error(be_->ctx));
    bindings_.push_back(b.handle);
    return kOk;
  };

  // Embeddings: [1,1] for decode (or the padded [1,B] if that is all it takes), [1,B] for prefill.
  const TensorDesc* ids_t = find(d.embeddings.inputs, "input_ids");
  if (!ids_t) return fail(kConfigError, "components." + d.embeddings.label + ".inputs.input_ids: missing input");
  const std::string emb_out = hidden_output_name(d.embeddings, "hidden_states");
  if (emb_out.empty())
    return fail(kConfigError, "components." + d.embeddings.label + ".outputs.hidden_states: missing output");
  bool takes1 = false, takesB = false;
  for (const auto& sh : ids_t->shapes) {
    takes1 = takes1 || product(sh) == 1;
    takesB = takesB || product(sh) == B_;
  }
  if (!takes1 && !takesB)
    return fail(kConfigError, "components." + d.embeddings.label + ".inputs.input_ids.shape: accepts neither [1, 1] nor [1, " +
                                  std::to_string(B_) + "]");
  emb_decode_padded_ = !takes1;
  const int64_t emb_d_n = takes1 ? 1 : B_;
  // Decode hidden states in backend memory (one row: every part that writes or
  // reads them sees the same layout): each part writes where the next reads.
  if (!emb_decode_padded_)
    for (uint16_t*& h : hid_d_)
      if (BackendBuffer* bb = backend_alloc("hidden_states", ANEMLL_DTYPE_FLOAT16, {1, 1, H_}))
        h = static_cast<uint16_t*>(bb->data);
  // The hidden output's seq dim follows the input_ids length of each binding.
  auto with_count = [](const ComponentDesc& c, const std::string& out_name, int64_t n) {
    ComponentDesc copy = c;
    for (TensorDesc& t : copy.outputs)
      if (t.name == out_name)
        for (auto& sh : t.shapes)
          if (sh.size() >= 2) sh[sh.size() - 2] = n;
    return copy;
  };
  {
    ComponentDesc c = with_count(d.embeddings, emb_out, emb_d_n);
    if (int rc = bind(emb_d_, c, emb_m, nullptr,
                      {{"input_ids", ids_d_, ANEMLL_DTYPE_INT32, emb_d_n, true}},
                      {{emb_out, hid_d_[0], ANEMLL_DTYPE_FLOAT16, emb_d_n * H_, true}}))
      return rc;
  }

  // Prefill mode.
  S_prefill_ = 0;
  if (!d.ffn_prefill.empty()) {
    const TensorDesc* h = find(d.ffn_prefill[0].inputs, "hidden_states");
    if (!h) return fail(kConfigError, "components." + d.ffn_prefill[0].label + ".inputs.hidden_states: missing input");
    const int64_t n = product(h->shapes.front());
    if (n == H_) S_prefill_ = 1;
    else if (n == B_ * H_) S_prefill_ = B_;
    else
      return fail(kConfigError, "components." + d.ffn_prefill[0].label + ".inputs.hidden_states.shape: " +
                                    shape_str(h->shapes.front()) + " is neither [1, 1, " + std::to_string(H_) +
                                    "] nor [1, " + std::to_string(B_) + ", " + std::to_string(H_) + "]");
  }
  if (d.sequential_prefill || S_prefill_ == 0) prefill_mode_ = "infer";
  else prefill_mode_ = S_prefill_ == 1 ? "sequential" : "batch";
  if (S_prefill_ == B_ && !takesB)
    return fail(kConfigError, "components." + d.embeddings.label + ".inputs.input_ids.shape: does not accept [1, " +
                                  std::to_string(B_) + "] needed by batch prefill");
  if (S_prefill_ == B_) {
    // Batch prefill hidden states, likewise (rows may be padded: the engine never reads them).
    for (uint16_t*& h : hid_p_)
      if (BackendBuffer* bb = backend_alloc("hidden_states", ANEMLL_DTYPE_FLOAT16, {1, B_, H_}))
        h = static_cast<uint16_t*>(bb->data);
    ComponentDesc c = with_count(d.embeddings, emb_out, B_);
    if (int rc = bind(emb_p_, c, emb_m, nullptr, {{"input_ids", ids_p_, ANEMLL_DTYPE_INT32, B_, true}},
                      {{emb_out, hid_p_[0], ANEMLL_DTYPE_FLOAT16, B_ * H_, true}}))
      return rc;
  }

  // FFN chunks: hidden states ping-pong between two buffers.
  infer_.resize(n_chunks_);
  for (int c = 0; c < n_chunks_; ++c) {
    const ComponentDesc& cd = d.ffn_infer[c];
    const std::string out = hidden_output_name(cd, "output_hidden_states");
    if (out.empty()) return fail(kConfigError, "components." + cd.label + ".outputs.output_hidden_states: missing output");
    if (int rc = bind(infer_[c], cd, inf_m[c], chunk_state[c],
                      {{"hidden_states", hid_d_[c % 2], ANEMLL_DTYPE_FLOAT16, H_, true},
                       {"position_ids", pos_d_, ANEMLL_DTYPE_INT32, 1, true},
                       {"causal_mask", mask_d_, ANEMLL_DTYPE_FLOAT16, ctx_, true},
                       {"current_pos", cur_d_, ANEMLL_DTYPE_INT32, 1, true},
                       {"update_mask", upd_d_, ANEMLL_DTYPE_FLOAT16, ctx_, false}},
                      {{out, hid_d_[(c + 1) % 2], ANEMLL_DTYPE_FLOAT16, H_, true}}))
      return rc;
  }
  if (S_prefill_ > 0) {
    const int64_t S = S_prefill_;
    prefill_.resize(d.ffn_prefill.size());
    for (int c = 0; c < n_chunks_; ++c) {
      const ComponentDesc& cd = d.ffn_prefill[c];
      const std::string out = hidden_output_name(cd, "output_hidden_states");
      if (out.empty()) return fail(kConfigError, "components." + cd.label + ".outputs.output_hidden_states: missing output");
      uint16_t** hid = S == 1 ? hid_d_ : hid_p_;
      std::vector<Slot> outs;
      // The last chunk's output is never read (ANEMLL returns only [1,1,H] there).
      if (c + 1 < n_chunks_) outs.push_back({out, hid[(c + 1) % 2], ANEMLL_DTYPE_FLOAT16, S * H_, true});
      if (int rc = bind(prefill_[c], cd, pre_m[c], chunk_state[c],
                        {{"hidden_states", hid[c % 2], ANEMLL_DTYPE_FLOAT16, S * H_, true},
                         {"position_ids", S == 1 ? pos_d_ : pos_p_, ANEMLL_DTYPE_INT32, S, true},
                         {"causal_mask", S == 1 ? mask_d_ : mask_p_, ANEMLL_DTYPE_FLOAT16, S * ctx_, true},
                         {"current_pos", S == 1 ? cur_d_ : cur_p_, ANEMLL_DTYPE_INT32, 1, true},
                         {"update_mask", S == 1 ? upd_d_ : upd_p_, ANEMLL_DTYPE_FLOAT16, S * ctx_, false}},
                        outs))
        return rc;
    }
  }

  // LM head: logits parts, or in-model argmax per part.
  std::vector<Slot> head_out;
  argmax_head_ = d.logits_outputs.empty();
  int64_t offset = 0;
  if (!argmax_head_) {
    for (const std::string& name : d.logits_outputs) {
      const TensorDesc* t = find(d.lm_head.outputs, name);
      if (!t) return fail(kConfigError, "components." + d.lm_head.label + ".outputs." + name + ": missing output");
      const int64_t n = product(t->shapes.front());
      if (BackendBuffer* bb = backend_alloc(name.c_str(), ANEMLL_DTYPE_FLOAT16, t->shapes.front())) {
        // The sampler reads the logits where the backend keeps them: one part per
        // contiguous row (rows may be padded), addressed from the mapped base.
        const size_t rank = bb->shape.size();
        const int64_t row = bb->shape.back();
        bb->first_part = static_cast<int>(parts_.size());
        bb->n_rows = static_cast<int>(n / row);
        std::vector<int64_t> idx(rank, 0);
        for (int r = 0; r < bb->n_rows; ++r) {
          int64_t off = 0;
          for (size_t k = 0; k + 1 < rank; ++k) off += idx[k] * bb->strides[k];
          bb->row_offsets.push_back(off);
          parts_.push_back({static_cast<uint16_t*>(bb->data) + off, row, offset + r * row});
          for (size_t k = rank - 1; k-- > 0;) {  // next row: odometer over the leading dimensions
            if (++idx[k] < bb->shape[k]) break;
            idx[k] = 0;
          }
        }
        logits_bufs_.push_back(static_cast<int>(bb - bufs_.data()));
        head_out.push_back({name, bb->data, ANEMLL_DTYPE_FLOAT16, n, true});
      } else {
        uint16_t* buf = f16(n);
        if (!buf) return fail(kConfigError, "out of memory");
        head_out.push_back({name, buf, ANEMLL_DTYPE_FLOAT16, n, true});
        parts_.push_back({buf, n, offset});
      }
      offset += n;
    }
    if (offset != V_)
      return fail(kConfigError, "components." + d.lm_head.label + ".outputs: the logits parts hold " +
                                    std::to_string(offset) + " entries but shapes.vocab_size is " + std::to_string(V_));
    for (const LogitsPart& p : parts_)
      if (p.offset < valid_) sample_parts_.push_back({p.data, std::min(p.size, valid_ - p.offset), p.offset});
  } else {
    const TensorDesc* it = find(d.lm_head.outputs, "argmax_idx");
    const TensorDesc* vt = find(d.lm_head.outputs, "argmax_val");
    if (!it || !vt)
      return fail(kConfigError, "components." + d.lm_head.label + ".outputs: neither logits nor argmax_idx/argmax_val");
    const int64_t np_ = product(it->shapes.front());
    if (vt->dtype != ANEMLL_DTYPE_FLOAT16 && vt->dtype != ANEMLL_DTYPE_FLOAT32)
      return fail(kConfigError, "components." + d.lm_head.label + ".outputs.argmax_val.data_type: must be FLOAT16 or FLOAT32");
    part_sizes_ = d.part_sizes;
    if (part_sizes_.empty()) {
      if (V_ % np_ != 0)
        return fail(kConfigError, "model_info.lm_head_chunk_sizes: needed, vocab_size " + std::to_string(V_) +
                                      " does not split evenly into " + std::to_string(np_) + " parts");
      part_sizes_.assign(static_cast<size_t>(np_), V_ / np_);
    }
    if (static_cast<int64_t>(part_sizes_.size()) != np_)
      return fail(kConfigError, "model_info.lm_head_chunk_sizes: " + std::to_string(part_sizes_.size()) +
                                    " sizes for " + std::to_string(np_) + " argmax parts");
    for (int64_t s : part_sizes_) {
      part_offsets_.push_back(offset);
      offset += s;
    }
    if (offset != V_)
      return fail(kConfigError, "model_info.lm_head_chunk_sizes: sum " + std::to_string(offset) +
                                    " differs from shapes.vocab_size " + std::to_string(V_));
    amax_idx_ = i32(np_);
    Buffer* vb = alloc(static_cast<size_t>(np_) * anemll_dtype_size(vt->dtype));
    if (!amax_idx_ || !vb) return fail(kConfigError, "out of memory");
    amax_val_ = vb->data;
    amax_val_dtype_ = vt->dtype;
    head_out.push_back({"argmax_idx", amax_idx_, ANEMLL_DTYPE_INT32, np_, true});
    head_out.push_back({"argmax_val", amax_val_, vt->dtype, np_, true});
  }
  if (int rc = bind(head_, d.lm_head, head_m, nullptr,
                    {{"hidden_states", hid_d_[n_chunks_ % 2], ANEMLL_DTYPE_FLOAT16, H_, true}}, head_out))
    return rc;
  SamplerConfig greedy;
  return configure_sampler(greedy);
}

int Engine::configure_sampler(const SamplerConfig& cfg) {
  std::string err = sampler_.configure(cfg, valid_, ctx_);
  if (!err.empty()) return fail(kInvalidArgument, err);
  if (argmax_head_ && sampler_.wants_logits()) {
    sampler_.configure(SamplerConfig{}, valid_, ctx_);
    return fail(kInvalidArgument,
                "sampler: this model's LM head outputs only argmax_idx/argmax_val, so it supports greedy "
                "decoding only (temperature 0, no penalties, logit_bias or logprobs)");
  }
  return kOk;
}

int Engine::set_token_mask(const uint32_t* words, int64_t n_bits) {
  if (words != nullptr && n_bits <= 0) return fail(kInvalidArgument, "token mask: n_bits must be > 0");
  if (words != nullptr && argmax_head_)
    return fail(kInvalidArgument,
                "token mask: this model's LM head outputs only argmax_idx/argmax_val, so a grammar "
                "(structured output) cannot constrain it");
  sampler_.set_token_mask(words, words != nullptr ? n_bits : 0);
  return kOk;
}

int Engine::reset() {
  for (anemll_state* s : states_)
    if (be_->reset_state(be_->ctx, s) != ANEMLL_OK)
      return fail(kBackendError, std::string("reset_state failed: ") + be_->last_error(be_->ctx));
  length_ = 0;
  return kOk;
}

void Engine::set_positions_decode(int64_t pos) {
  *pos_d_ = static_cast<int32_t>(pos);
  *cur_d_ = static_cast<int32_t>(pos);
  std::memcpy(mask_d_, mask_full_ + pos * ctx_, static_cast<size_t>(ctx_) * 2);
  if (upd_d_last_ >= 0) upd_d_[upd_d_last_] = kHalfZero;
  upd_d_[pos] = kHalfOne;
  upd_d_last_ = pos;
}

int Engine::run_one_token(int32_t token, int64_t pos, std::vector<Binding>& chunks, int64_t& calls) {
  ids_d_[0] = token;
  if (int rc = predict(emb_d_)) return rc;
  ++embed_calls;
  set_positions_decode(pos);
  for (int c = 0; c < n_chunks_; ++c) {
    if (int rc = predict(chunks[c])) return rc;
    ++calls;
  }
  return kOk;
}

int Engine::run_infer(int32_t token, int64_t pos) { return run_one_token(token, pos, infer_, infer_calls); }

int Engine::run_prefill_single(int32_t token, int64_t pos) {
  return run_one_token(token, pos, prefill_, prefill_calls);
}

int Engine::run_prefill_batch(const int32_t* tokens, int64_t count, int64_t pos) {
  // Padding ids are 0; their positions continue past the prompt and are
  // overwritten by later steps before any query can see them.
  std::memcpy(ids_p_, tokens, static_cast<size_t>(count) * 4);
  std::memset(ids_p_ + count, 0, static_cast<size_t>(B_ - count) * 4);
  if (int rc = predict(emb_p_)) return rc;
  ++embed_calls;
  for (int64_t i = 0; i < B_; ++i) pos_p_[i] = static_cast<int32_t>(pos + i);
  *cur_p_ = static_cast<int32_t>(pos);
  std::memcpy(mask_p_, mask_full_ + pos * ctx_, static_cast<size_t>(B_ * ctx_) * 2);
  std::memset(upd_p_, 0, static_cast<size_t>(B_ * ctx_) * 2);
  for (int64_t i = 0; i < B_; ++i) upd_p_[(pos + i) * B_ + i] = kHalfOne;  // [ctx, B] layout
  for (int c = 0; c < n_chunks_; ++c) {
    if (int rc = predict(prefill_[c])) return rc;
    ++prefill_calls;
  }
  return kOk;
}

int Engine::prefill(const int32_t* tokens, int64_t n, int64_t start) { return feed(tokens, n, start, false); }

int Engine::replay(const int32_t* tokens, int64_t n, int64_t start) { return feed(tokens, n, start, true); }

int Engine::feed(const int32_t* tokens, int64_t n, int64_t start, bool one_by_one) {
  if (n <= 0) return fail(kInvalidArgument, "prefill: the prompt is empty");
  if (start < 0 || start > length_)
    return fail(kInvalidArgument, "prefill: start position " + std::to_string(start) + " leaves a gap: only " +
                                      std::to_string(length_) + " tokens are cached");
  if (start + n > ctx_)
    return fail(kInvalidArgument, "prefill: " + std::to_string(n) + " tokens from position " + std::to_string(start) +
                                      " do not fit the context length " + std::to_string(ctx_));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= valid_)
      return fail(kInvalidArgument, "prefill: token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                        " is outside the vocabulary [0, " + std::to_string(valid_) + ")");
  length_ = start;  // cache beyond start is about to be overwritten
  int64_t p = start;
  const int64_t end = start + n;
  while (p < end) {
    int rc;
    int64_t done;
    if (!one_by_one && prefill_mode_ == "batch" && p + B_ <= ctx_) {
      done = std::min(B_, end - p);
      rc = run_prefill_batch(tokens + (p - start), done, p);
    } else if (!one_by_one && prefill_mode_ == "sequential") {
      done = 1;
      rc = run_prefill_single(tokens[p - start], p);
    } else {
      // Tail near the end of the context (a padded batch would pass it), or
      // infer-only prefill: one token at a time through infer.
      done = 1;
      rc = run_infer(tokens[p - start], p);
    }
    if (rc) return rc;
    std::memcpy(history_.data() + p, tokens + (p - start), static_cast<size_t>(done) * 4);
    p += done;
    length_ = p;
  }
  return kOk;
}

int Engine::run_head_and_sample(int64_t pos, int32_t* next) {
  if (int rc = predict(head_)) return rc;
  ++head_calls;
  if (argmax_head_) {
    int32_t best = -1;
    float best_v = 0.0f;
    for (size_t p = 0; p < part_sizes_.size(); ++p) {
      const int64_t idx = amax_idx_[p];
      int64_t global;
      if (idx >= 0 && idx < part_sizes_[p]) global = part_offsets_[p] + idx;  // index within the part
      else if (idx >= part_offsets_[p] && idx < part_offsets_[p] + part_sizes_[p]) global = idx;  // already global
      else
        return fail(kBackendError, head_.label + ": argmax_idx[" + std::to_string(p) + "] = " + std::to_string(idx) +
                                       " is outside part " + std::to_string(p) + " (size " + std::to_string(part_sizes_[p]) + ")");
      // An in-model argmax cannot be masked: a winner past the tokenizer drops its part.
      if (global >= valid_) continue;
      const float v = amax_val_dtype_ == ANEMLL_DTYPE_FLOAT16 ? half_to_float(static_cast<uint16_t*>(amax_val_)[p])
                                                             : static_cast<float*>(amax_val_)[p];
      if (best < 0 || v > best_v) {
        best = static_cast<int32_t>(global);
        best_v = v;
      }
    }
    if (best < 0)
      return fail(kBackendError, head_.label + ": every part's argmax is past the tokenizer's vocabulary (" +
                                     std::to_string(valid_) + " ids)");
    *next = best;
    return kOk;
  }
  if (int rc = map_logits()) return rc;
  const int sampled = sampler_.sample(sample_parts_.data(), static_cast<int>(sample_parts_.size()), history_.data(),
                                      pos + 1, next);
  unmap_logits();
  if (sampled != 0) return fail(kInvalidArgument, std::string("sampler: ") + sampler_.error());
  return kOk;
}

int Engine::step(int32_t token, int64_t pos, int32_t* next) {
  if (token < 0 || token >= valid_)
    return fail(kInvalidArgument, "step: token id " + std::to_string(token) + " is outside the vocabulary [0, " +
                                      std::to_string(valid_) + ")");
  if (pos < 0 || pos >= ctx_)
    return fail(kInvalidArgument, "step: position " + std::to_string(pos) + " is past the context length " +
                                      std::to_string(ctx_));
  if (pos > length_)
    return fail(kInvalidArgument, "step: position " + std::to_string(pos) + " leaves a gap: only " +
                                      std::to_string(length_) + " tokens are cached");
  length_ = pos;  // on failure the cache stays valid up to pos - 1
  if (int rc = run_infer(token, pos)) return rc;
  history_[static_cast<size_t>(pos)] = token;
  length_ = pos + 1;
  return run_head_and_sample(pos, next);
}

}  // namespace anemll
