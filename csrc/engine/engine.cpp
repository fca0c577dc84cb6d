#include "engine/engine.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
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

std::vector<std::string> state_names(const ComponentDesc& c) {
  std::vector<std::string> names;
  for (const auto& s : c.states) names.push_back(s.name);
  std::sort(names.begin(), names.end());
  return names;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ", ") + x;
  return out;
}

std::string where_declared(const ComponentDesc& c) {
  return "components." + c.label + " (" + c.path + (c.function.empty() ? "" : ", function " + c.function) + ")";
}

}  // namespace

int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Engine::reset_timing() {
  const size_t chunks = static_cast<size_t>(n_chunks_);
  timing_ = StepTiming();
  timing_.chunk_ns.assign(chunks, 0);
}

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
  reset_timing();
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
  mono_ = d.monolithic;
  W_ = d.sliding_window;
  if (mono_ && n_chunks_ != 1)
    return fail(kConfigError, "components.ffn_infer: a monolithic model is one file, got " + std::to_string(n_chunks_) + " parts");
  if (W_ < 0) return fail(kConfigError, "model_info.sliding_window: must be positive");
  if (!d.ffn_infer_rotate.empty() && d.ffn_infer_rotate.size() != d.ffn_infer.size())
    return fail(kConfigError, "components.ffn_infer_rotate: chunk count differs from components.ffn_infer");
  if (W_ > 0 && W_ < ctx_ && d.ffn_infer_rotate.empty())
    return fail(kConfigError, "components.ffn_infer_rotate: missing: the sliding window (" + std::to_string(W_) +
                                  ") is shorter than the context (" + std::to_string(ctx_) + "), so positions >= " +
                                  std::to_string(W_) + " need function infer_rotate of " + d.ffn_infer[0].path);
  if (W_ >= ctx_) W_ = 0;  // the local cache never fills: plain infer/prefill throughout

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
  // One level per context size, each with mask buffers of its width.
  int64_t prev_ctx = 0;
  for (const ContextFunctions& cf : d.smaller_contexts) {
    if (cf.context_length <= prev_ctx || cf.context_length >= ctx_)
      return fail(kConfigError, "context switching: context sizes must ascend below context_length " +
                                    std::to_string(ctx_) + ", got " + std::to_string(cf.context_length));
    if (cf.ffn_infer.size() != d.ffn_infer.size() || cf.ffn_prefill.size() != d.ffn_prefill.size() ||
        cf.ffn_infer_rotate.size() != d.ffn_infer_rotate.size())
      return fail(kConfigError, "context switching: the functions of context " + std::to_string(cf.context_length) +
                                    " do not match the chunks of context " + std::to_string(ctx_));
    prev_ctx = cf.context_length;
  }
  if (!d.smaller_contexts.empty() &&
      (be_->struct_size < offsetof(anemll_backend, copy_state) + sizeof(be_->copy_state) || !be_->copy_state))
    return fail(kConfigError, std::string("context switching: backend ") + be_->name + " cannot copy states");
  levels_.resize(d.smaller_contexts.size() + 1);
  for (size_t i = 0; i < levels_.size(); ++i) {
    Level& lv = levels_[i];
    lv.ctx = i < d.smaller_contexts.size() ? d.smaller_contexts[i].context_length : ctx_;
    lv.mask_d = f16(lv.ctx);
    lv.mask_p = f16(B_ * lv.ctx);
    lv.upd_d = f16(lv.ctx);
    lv.upd_p = f16(lv.ctx * B_);
    if (!lv.mask_p || !lv.upd_p) return fail(kConfigError, "out of memory allocating engine buffers");
  }
  lvl_ = 0;
  history_.assign(static_cast<size_t>(ctx_), 0);
  // The causal mask, once for the whole context: row i sees columns <= i.
  for (int64_t r = 0; r < ctx_; ++r)
    for (int64_t c = 0; c < ctx_; ++c) mask_full_[r * ctx_ + c] = c <= r ? kHalfZero : kHalfNegInf;

  // Models.
  anemll_model* emb_m = nullptr;
  if (!mono_)
    if (int rc = load(d.embeddings, &emb_m)) return rc;
  anemll_model* head_m = nullptr;
  if (!mono_)
    if (int rc = load(d.lm_head, &head_m)) return rc;

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

  // Head outputs: the LM head's, or a monolithic model's infer function's.
  const ComponentDesc& head_desc = mono_ ? d.ffn_infer[0] : d.lm_head;
  std::vector<Slot> head_out;
  argmax_head_ = d.logits_outputs.empty();
  int64_t offset = 0;
  if (!argmax_head_) {
    for (const std::string& name : d.logits_outputs) {
      const TensorDesc* t = find(head_desc.outputs, name);
      if (!t) return fail(kConfigError, "components." + head_desc.label + ".outputs." + name + ": missing output");
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
      return fail(kConfigError, "components." + head_desc.label + ".outputs: the logits parts hold " +
                                    std::to_string(offset) + " entries but shapes.vocab_size is " + std::to_string(V_));
    for (const LogitsPart& p : parts_)
      if (p.offset < valid_) sample_parts_.push_back({p.data, std::min(p.size, valid_ - p.offset), p.offset});
  } else {
    const TensorDesc* it = find(head_desc.outputs, "argmax_idx");
    const TensorDesc* vt = find(head_desc.outputs, "argmax_val");
    if (!it || !vt)
      return fail(kConfigError, "components." + head_desc.label + ".outputs: neither logits nor argmax_idx/argmax_val");
    const int64_t np_ = product(it->shapes.front());
    if (vt->dtype != ANEMLL_DTYPE_FLOAT16 && vt->dtype != ANEMLL_DTYPE_FLOAT32)
      return fail(kConfigError, "components." + head_desc.label + ".outputs.argmax_val.data_type: must be FLOAT16 or FLOAT32");
    part_sizes_ = d.part_sizes;
    if (part_sizes_.empty() && np_ > 0)  // as ANEMLL 0.3.5's chat.py: the remainder goes to the first parts
      for (int64_t p = 0; p < np_; ++p) part_sizes_.push_back(V_ / np_ + (p < V_ % np_ ? 1 : 0));
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

  // Token ids: [1,1] for decode (or the padded [1,B] if that is all it takes), [1,B] for prefill. They feed
  // the embeddings, or a monolithic model's functions directly.
  const ComponentDesc& ids_desc = mono_ ? d.ffn_infer[0] : d.embeddings;
  const TensorDesc* ids_t = find(ids_desc.inputs, "input_ids");
  if (!ids_t) return fail(kConfigError, "components." + ids_desc.label + ".inputs.input_ids: missing input");
  bool takes1 = false, takesB = false;
  for (const auto& sh : ids_t->shapes) {
    takes1 = takes1 || product(sh) == 1;
    takesB = takesB || product(sh) == B_;
  }
  if (!takes1 && (mono_ || !takesB))
    return fail(kConfigError, "components." + ids_desc.label + ".inputs.input_ids.shape: accepts neither [1, 1] nor [1, " +
                                  std::to_string(B_) + "]");
  emb_decode_padded_ = !takes1;
  const int64_t emb_d_n = takes1 ? 1 : B_;
  // Decode hidden states in backend memory (one row: every part that writes or
  // reads them sees the same layout): each part writes where the next reads.
  if (!emb_decode_padded_ && !mono_)
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
  std::string emb_out;
  if (!mono_) {
    emb_out = hidden_output_name(d.embeddings, "hidden_states");
    if (emb_out.empty())
      return fail(kConfigError, "components." + d.embeddings.label + ".outputs.hidden_states: missing output");
    ComponentDesc c = with_count(d.embeddings, emb_out, emb_d_n);
    if (int rc = bind(emb_d_, c, emb_m, nullptr,
                      {{"input_ids", ids_d_, ANEMLL_DTYPE_INT32, emb_d_n, true}},
                      {{emb_out, hid_d_[0], ANEMLL_DTYPE_FLOAT16, emb_d_n * H_, true}}))
      return rc;
  }

  // Prefill mode, from the sequence length of the prefill function's first input.
  S_prefill_ = 0;
  if (!d.ffn_prefill.empty()) {
    const char* first_in = mono_ ? "input_ids" : "hidden_states";
    const int64_t unit = mono_ ? 1 : H_;
    const TensorDesc* h = find(d.ffn_prefill[0].inputs, first_in);
    if (!h)
      return fail(kConfigError, "components." + d.ffn_prefill[0].label + ".inputs." + first_in + ": missing input");
    const int64_t n = product(h->shapes.front());
    if (n == unit) S_prefill_ = 1;
    else if (n == B_ * unit) S_prefill_ = B_;
    else
      return fail(kConfigError, "components." + d.ffn_prefill[0].label + ".inputs." + first_in + ".shape: " +
                                    shape_str(h->shapes.front()) + " holds neither 1 nor " + std::to_string(B_) +
                                    " positions");
  }
  if (d.sequential_prefill || S_prefill_ == 0) prefill_mode_ = "infer";
  else prefill_mode_ = S_prefill_ == 1 ? "sequential" : "batch";
  if (S_prefill_ == B_ && !mono_ && !takesB)
    return fail(kConfigError, "components." + d.embeddings.label + ".inputs.input_ids.shape: does not accept [1, " +
                                  std::to_string(B_) + "] needed by batch prefill");
  if (S_prefill_ == B_ && !mono_) {
    // Batch prefill hidden states, likewise (rows may be padded: the engine never reads them).
    for (uint16_t*& h : hid_p_)
      if (BackendBuffer* bb = backend_alloc("hidden_states", ANEMLL_DTYPE_FLOAT16, {1, B_, H_}))
        h = static_cast<uint16_t*>(bb->data);
    ComponentDesc c = with_count(d.embeddings, emb_out, B_);
    if (int rc = bind(emb_p_, c, emb_m, nullptr, {{"input_ids", ids_p_, ANEMLL_DTYPE_INT32, B_, true}},
                      {{emb_out, hid_p_[0], ANEMLL_DTYPE_FLOAT16, B_ * H_, true}}))
      return rc;
  }

  // FFN chunks (or the monolithic file), per context size: hidden states ping-pong between two buffers.
  auto first_input = [&](uint16_t* hid, int32_t* ids, int64_t S) -> Slot {
    if (mono_) return {"input_ids", ids, ANEMLL_DTYPE_INT32, S, true};
    return {"hidden_states", hid, ANEMLL_DTYPE_FLOAT16, S * H_, true};
  };
  for (size_t li = 0; li < levels_.size(); ++li) {
    Level& lv = levels_[li];
    const bool top = li + 1 == levels_.size();
    const std::vector<ComponentDesc>& infer_d = top ? d.ffn_infer : d.smaller_contexts[li].ffn_infer;
    const std::vector<ComponentDesc>& prefill_d = top ? d.ffn_prefill : d.smaller_contexts[li].ffn_prefill;
    // Rotate functions are loaded only when positions can pass the window.
    static const std::vector<ComponentDesc> kNone;
    const std::vector<ComponentDesc>& rot_d =
        W_ == 0 ? kNone : top ? d.ffn_infer_rotate : d.smaller_contexts[li].ffn_infer_rotate;
    std::vector<anemll_model*> inf_m(infer_d.size()), pre_m(prefill_d.size()), rot_m(rot_d.size());
    for (size_t c = 0; c < infer_d.size(); ++c)
      if (int rc = load(infer_d[c], &inf_m[c])) return rc;
    for (size_t c = 0; c < prefill_d.size(); ++c)
      if (int rc = load(prefill_d[c], &pre_m[c])) return rc;
    for (size_t c = 0; c < rot_d.size(); ++c)
      if (int rc = load(rot_d[c], &rot_m[c])) return rc;

    // States, shared by name across every chunk and function of this size: infer, then prefill, then rotate.
    std::vector<const ComponentDesc*> ffn_comps;
    std::vector<anemll_model*> ffn_models;
    for (size_t c = 0; c < infer_d.size(); ++c) ffn_comps.push_back(&infer_d[c]), ffn_models.push_back(inf_m[c]);
    for (size_t c = 0; c < prefill_d.size(); ++c) ffn_comps.push_back(&prefill_d[c]), ffn_models.push_back(pre_m[c]);
    for (size_t c = 0; c < rot_d.size(); ++c) ffn_comps.push_back(&rot_d[c]), ffn_models.push_back(rot_m[c]);
    std::vector<anemll_state*> comp_state;
    if (int rc = make_states(ffn_comps, ffn_models, comp_state, lv)) return rc;
    if (li > 0 && lv.sets != levels_[0].sets)
      return fail(kConfigError, "context switching: the functions of context " + std::to_string(lv.ctx) +
                                    " declare other states than those of context " + std::to_string(levels_[0].ctx));
    auto state_of = [&](size_t group, int c) { return comp_state[group + static_cast<size_t>(c)]; };
    const size_t kInfer = 0, kPrefill = infer_d.size(), kRotate = kPrefill + prefill_d.size();

    auto bind_infer = [&](std::vector<Binding>& out, const std::vector<ComponentDesc>& descs,
                          const std::vector<anemll_model*>& models, size_t group) -> int {
      out.resize(descs.size());
      for (int c = 0; c < n_chunks_; ++c) {
        const ComponentDesc& cd = descs[c];
        std::vector<Slot> outs = head_out;
        if (!mono_) {
          const std::string name = hidden_output_name(cd, "output_hidden_states");
          if (name.empty())
            return fail(kConfigError, "components." + cd.label + ".outputs.output_hidden_states: missing output");
          outs = {{name, hid_d_[(c + 1) % 2], ANEMLL_DTYPE_FLOAT16, H_, true}};
        }
        if (int rc = bind(out[c], cd, models[c], state_of(group, c),
                          {first_input(hid_d_[c % 2], ids_d_, 1),
                           {"position_ids", pos_d_, ANEMLL_DTYPE_INT32, 1, true},
                           {"causal_mask", lv.mask_d, ANEMLL_DTYPE_FLOAT16, lv.ctx, true},
                           {"current_pos", cur_d_, ANEMLL_DTYPE_INT32, 1, true},
                           {"update_mask", lv.upd_d, ANEMLL_DTYPE_FLOAT16, lv.ctx, false}},
                          outs))
          return rc;
      }
      return kOk;
    };
    if (int rc = bind_infer(lv.infer, infer_d, inf_m, kInfer)) return rc;
    if (W_ > 0)
      if (int rc = bind_infer(lv.infer_rot, rot_d, rot_m, kRotate)) return rc;
    if (S_prefill_ > 0) {
      const int64_t S = S_prefill_;
      lv.prefill.resize(prefill_d.size());
      for (int c = 0; c < n_chunks_; ++c) {
        const ComponentDesc& cd = prefill_d[c];
        uint16_t** hid = S == 1 ? hid_d_ : hid_p_;
        std::vector<Slot> outs;
        // The last chunk's output is never read (ANEMLL returns only [1,1,H] there; a monolithic prefill, if
        // it returns logits, returns them for a batch whose next token comes from infer anyway).
        if (!mono_ && c + 1 < n_chunks_) {
          const std::string name = hidden_output_name(cd, "output_hidden_states");
          if (name.empty())
            return fail(kConfigError, "components." + cd.label + ".outputs.output_hidden_states: missing output");
          outs.push_back({name, hid[(c + 1) % 2], ANEMLL_DTYPE_FLOAT16, S * H_, true});
        }
        if (int rc = bind(lv.prefill[c], cd, pre_m[c], state_of(kPrefill, c),
                          {first_input(hid[c % 2], S == 1 ? ids_d_ : ids_p_, S),
                           {"position_ids", S == 1 ? pos_d_ : pos_p_, ANEMLL_DTYPE_INT32, S, true},
                           {"causal_mask", S == 1 ? lv.mask_d : lv.mask_p, ANEMLL_DTYPE_FLOAT16, S * lv.ctx, true},
                           {"current_pos", S == 1 ? cur_d_ : cur_p_, ANEMLL_DTYPE_INT32, 1, true},
                           {"update_mask", S == 1 ? lv.upd_d : lv.upd_p, ANEMLL_DTYPE_FLOAT16, S * lv.ctx, false}},
                          outs))
          return rc;
      }
    }
  }

  if (mono_) head_.label = d.ffn_infer[0].label;
  if (!mono_)
    if (int rc = bind(head_, d.lm_head, head_m, nullptr,
                      {{"hidden_states", hid_d_[n_chunks_ % 2], ANEMLL_DTYPE_FLOAT16, H_, true}}, head_out))
      return rc;
  SamplerConfig greedy;
  return configure_sampler(greedy);
}

int Engine::make_states(const std::vector<const ComponentDesc*>& comps, const std::vector<anemll_model*>& models,
                        std::vector<anemll_state*>& out, Level& level) {
  out.assign(comps.size(), nullptr);
  // One spec per state name, wherever it is declared.
  for (size_t i = 0; i < comps.size(); ++i)
    for (const TensorDesc& s : comps[i]->states)
      for (size_t j = 0; j < i; ++j) {
        const TensorDesc* o = find(comps[j]->states, s.name);
        if (o && (o->dtype != s.dtype || o->shapes.front() != s.shapes.front()))
          return fail(kConfigError, "components." + comps[i]->label + ".states." + s.name + ": " +
                                        anemll_dtype_name(s.dtype) + " " + shape_str(s.shapes.front()) + " in " +
                                        where_declared(*comps[i]) + " differs from " + anemll_dtype_name(o->dtype) +
                                        " " + shape_str(o->shapes.front()) + " in " + where_declared(*comps[j]) +
                                        "; a state shared by name needs one spec");
      }
  // One backend state per distinct set of names: a backend state (Core ML's MLState) holds every state of the
  // model it is made from, so parts sharing one state must declare the same set.
  std::vector<std::vector<std::string>> sets(comps.size());
  for (size_t i = 0; i < comps.size(); ++i) sets[i] = state_names(*comps[i]);
  for (size_t i = 0; i < comps.size(); ++i) {
    if (sets[i].empty()) continue;
    size_t same = i;
    for (size_t j = 0; j < i && same == i; ++j)
      if (sets[j] == sets[i]) same = j;
    if (same != i) {
      out[i] = out[same];
      continue;
    }
    for (size_t j = 0; j < i; ++j)
      for (const std::string& n : sets[i])
        if (std::binary_search(sets[j].begin(), sets[j].end(), n))
          return fail(kConfigError, "components." + comps[i]->label + ".states: " + where_declared(*comps[i]) +
                                        " declares {" + join(sets[i]) + "} but " + where_declared(*comps[j]) +
                                        " declares {" + join(sets[j]) + "}; state " + n +
                                        " is shared, so both must declare the same set of states");
    if (be_->make_state(be_->ctx, models[i], &out[i]) != ANEMLL_OK || !out[i])
      return fail(kBackendError, comps[i]->label + ": cannot make state: " + be_->last_error(be_->ctx));
    states_.push_back(out[i]);
    for (const TensorDesc& t : comps[i]->states) {  // what save/restore of the KV cache copies
      StateTensor st;
      st.state = static_cast<int64_t>(states_.size()) - 1;
      st.name = t.name;
      st.dtype = t.dtype;
      st.shape = t.shapes.front();
      size_t n = anemll_dtype_size(t.dtype);
      for (int64_t v : st.shape) n *= static_cast<size_t>(v);
      st.nbytes = n;
      state_tensors_.push_back(st);
    }
    level.states.push_back(out[i]);
    level.sets.push_back(sets[i]);
  }
  return kOk;
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
  lvl_ = 0;
  return kOk;
}

bool Engine::can_access_states() const { return anemll_backend_has_state_io(be_) != 0; }

int Engine::check_state_io(size_t i, size_t nbytes, const char* verb) {
  if (!can_access_states())
    return fail(kBackendError, std::string("the ") + be_->name + " backend cannot " + verb + " its state buffers");
  if (i >= state_tensors_.size()) return fail(kInvalidArgument, "state tensor index " + std::to_string(i) + " out of range");
  const StateTensor& t = state_tensors_[i];
  if (nbytes != t.nbytes)
    return fail(kInvalidArgument, "state '" + t.name + "' holds " + std::to_string(t.nbytes) + " bytes, not " +
                                      std::to_string(nbytes));
  return kOk;
}

int Engine::read_state(size_t i, void* dst, size_t nbytes) {
  if (int rc = check_state_io(i, nbytes, "read")) return rc;
  const StateTensor& t = state_tensors_[i];
  if (be_->read_state(be_->ctx, states_[static_cast<size_t>(t.state)], t.name.c_str(), dst, nbytes) != ANEMLL_OK)
    return fail(kBackendError, "state '" + t.name + "': read failed: " + be_->last_error(be_->ctx));
  return kOk;
}

int Engine::write_state(size_t i, const void* src, size_t nbytes) {
  if (int rc = check_state_io(i, nbytes, "write")) return rc;
  const StateTensor& t = state_tensors_[i];
  length_ = 0;  // the cache matches no history until set_history
  if (be_->write_state(be_->ctx, states_[static_cast<size_t>(t.state)], t.name.c_str(), src, nbytes) != ANEMLL_OK)
    return fail(kBackendError, "state '" + t.name + "': write failed: " + be_->last_error(be_->ctx));
  return kOk;
}

int Engine::set_history(const int32_t* tokens, int64_t n) {
  if (n < 0 || n > ctx_)
    return fail(kInvalidArgument, "history: " + std::to_string(n) + " tokens do not fit the context length " +
                                      std::to_string(ctx_));
  for (int64_t k = 0; k < n; ++k)
    if (tokens[k] < 0 || tokens[k] >= V_)
      return fail(kInvalidArgument, "history: token id " + std::to_string(tokens[k]) + " at index " +
                                        std::to_string(k) + " is outside the vocabulary");
  if (n) std::memcpy(history_.data(), tokens, static_cast<size_t>(n) * 4);
  length_ = n;
  return kOk;
}

int Engine::set_active_context(int64_t ctx) {
  std::string sizes;
  for (size_t i = 0; i < levels_.size(); ++i) {
    if (levels_[i].ctx == ctx) {
      lvl_ = static_cast<int>(i);
      return kOk;
    }
    sizes += (i ? ", " : "") + std::to_string(levels_[i].ctx);
  }
  return fail(kInvalidArgument, "active context: " + std::to_string(ctx) + " is not one of the model's context sizes (" +
                                    sizes + ")");
}

void Engine::set_positions_decode(int64_t pos) {
  *pos_d_ = static_cast<int32_t>(pos);
  *cur_d_ = static_cast<int32_t>(pos);
  Level& lv = levels_[lvl_];
  std::memcpy(lv.mask_d, mask_full_ + pos * ctx_, static_cast<size_t>(lv.ctx) * 2);
  if (lv.upd_d_last >= 0) lv.upd_d[lv.upd_d_last] = kHalfZero;
  lv.upd_d[pos] = kHalfOne;
  lv.upd_d_last = pos;
}

int Engine::run_one_token(int32_t token, int64_t pos, std::vector<Binding>& chunks, int64_t& calls) {
  ids_d_[0] = token;
  const bool timed = timing_step_;
  if (!mono_) {
    const int64_t t0 = timed ? monotonic_ns() : 0;
    if (int rc = predict(emb_d_)) return rc;
    if (timed) timing_.embed_ns += monotonic_ns() - t0;
    ++embed_calls;
  }
  set_positions_decode(pos);
  for (int c = 0; c < n_chunks_; ++c) {
    const int64_t t0 = timed ? monotonic_ns() : 0;
    if (int rc = predict(chunks[c])) return rc;
    if (timed) timing_.chunk_ns[static_cast<size_t>(c)] += monotonic_ns() - t0;
    ++calls;
  }
  return kOk;
}

int Engine::run_infer(int32_t token, int64_t pos) {
  if (int rc = use_context_for(pos + 1)) return rc;
  if (rotates_at(pos)) return run_one_token(token, pos, levels_[lvl_].infer_rot, infer_rotate_calls);
  return run_one_token(token, pos, levels_[lvl_].infer, infer_calls);
}

int Engine::run_prefill_single(int32_t token, int64_t pos) {
  if (int rc = use_context_for(pos + 1)) return rc;
  return run_one_token(token, pos, levels_[lvl_].prefill, prefill_calls);
}

int64_t Engine::context_at(int64_t pos) const {
  for (size_t i = static_cast<size_t>(lvl_); i < levels_.size(); ++i)
    if (levels_[i].ctx > pos) return levels_[i].ctx;
  return ctx_;
}

int Engine::use_context_for(int64_t end) {
  size_t target = static_cast<size_t>(lvl_);
  while (levels_[target].ctx < end && target + 1 < levels_.size()) ++target;
  if (target == static_cast<size_t>(lvl_)) return kOk;
  return switch_context(target);
}

int Engine::switch_context(size_t target) {
  // ANEMLL's context switch: the cache moves into the other size's states, over the positions both hold.
  Level& from = levels_[lvl_];
  Level& to = levels_[target];
  for (size_t i = 0; i < to.states.size(); ++i)
    if (be_->copy_state(be_->ctx, from.states[i], to.states[i]) != ANEMLL_OK)
      return fail(kBackendError, "context switch " + std::to_string(from.ctx) + " -> " + std::to_string(to.ctx) +
                                     ": copy_state failed: " + be_->last_error(be_->ctx));
  lvl_ = static_cast<int>(target);
  ++context_switches;
  return kOk;
}

int Engine::run_prefill_batch(const int32_t* tokens, int64_t count, int64_t pos) {
  // Padding ids are 0; their positions continue past the prompt and are
  // overwritten by later steps before any query can see them.
  std::memcpy(ids_p_, tokens, static_cast<size_t>(count) * 4);
  std::memset(ids_p_ + count, 0, static_cast<size_t>(B_ - count) * 4);
  if (!mono_) {
    if (int rc = predict(emb_p_)) return rc;
    ++embed_calls;
  }
  for (int64_t i = 0; i < B_; ++i) pos_p_[i] = static_cast<int32_t>(pos + i);
  *cur_p_ = static_cast<int32_t>(pos);
  if (int rc = use_context_for(pos + B_)) return rc;
  Level& lv = levels_[lvl_];
  for (int64_t r = 0; r < B_; ++r)  // rows pos.. of the full mask, as wide as this context
    std::memcpy(lv.mask_p + r * lv.ctx, mask_full_ + (pos + r) * ctx_, static_cast<size_t>(lv.ctx) * 2);
  std::memset(lv.upd_p, 0, static_cast<size_t>(B_ * lv.ctx) * 2);
  for (int64_t i = 0; i < B_; ++i) lv.upd_p[(pos + i) * B_ + i] = kHalfOne;  // [ctx, B] layout
  for (int c = 0; c < n_chunks_; ++c) {
    if (int rc = predict(lv.prefill[c])) return rc;
    ++prefill_calls;
  }
  return kOk;
}

bool Engine::batch_prefill_at(int64_t pos) const {
  // A padded batch writes B positions; in a sliding-window model they must also fit the local cache unrotated:
  // a prefill_rotate batch would let sliding layers see later tokens of the batch and lose earlier history.
  return prefill_mode_ == "batch" && pos + B_ <= ctx_ && (W_ == 0 || pos + B_ <= W_);
}

int Engine::run_positions(const int32_t* tokens, int64_t n, int64_t start, bool one_by_one) {
  int64_t p = start;
  const int64_t end = start + n;
  while (p < end) {
    int rc;
    int64_t done;
    if (!one_by_one && batch_prefill_at(p)) {
      done = std::min(B_, end - p);
      rc = run_prefill_batch(tokens + (p - start), done, p);
    } else if (!one_by_one && prefill_mode_ == "sequential" && !rotates_at(p)) {
      done = 1;
      rc = run_prefill_single(tokens[p - start], p);
    } else {
      // Tail near the end of the context (a padded batch would pass it), past a sliding window (infer_rotate,
      // one position at a time), infer-only prefill, or a replay one token at a time as decode fed it.
      done = 1;
      rc = run_infer(tokens[p - start], p);
    }
    if (rc) return rc;
    std::memmove(history_.data() + p, tokens + (p - start), static_cast<size_t>(done) * 4);
    p += done;
    length_ = p;
  }
  return kOk;
}

int Engine::rewind_to(int64_t pos) {
  if (pos >= length_) return kOk;
  // Context switching: back to the smallest size that holds the kept positions and the next one.
  size_t target = 0;
  while (levels_[target].ctx <= pos && target + 1 < levels_.size()) ++target;
  if (target < static_cast<size_t>(lvl_)) {
    if (int rc = switch_context(target)) return rc;
  }
  // Once positions reached the sliding window the local cache holds only the last W positions, shifted: it
  // cannot go back, so the cache is rebuilt from the history (each position again exactly once).
  if (W_ == 0 || length_ <= W_) return kOk;
  const int64_t keep = pos;
  if (int rc = reset()) return rc;
  ++cache_rebuilds;
  return keep > 0 ? run_positions(history_.data(), keep, 0, false) : kOk;
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
  if (int rc = rewind_to(start)) return rc;
  length_ = start;  // cache beyond start is about to be overwritten
  return run_positions(tokens, n, start, one_by_one);
}

int Engine::run_head_and_sample(int64_t pos, int32_t* next) {
  const bool timed = timing_step_;
  if (!mono_) {  // a monolithic infer has already written the head outputs
    const int64_t t0 = timed ? monotonic_ns() : 0;
    if (int rc = predict(head_)) return rc;
    if (timed) timing_.head_ns += monotonic_ns() - t0;
    ++head_calls;
  }
  // The sampler's time: reading the logits (mapping them, or the in-model argmax parts) and choosing.
  const int64_t t_sample = timed ? monotonic_ns() : 0;
  const int rc = choose_token(pos, next);
  if (timed) timing_.sample_ns += monotonic_ns() - t_sample;
  return rc;
}

int Engine::choose_token(int64_t pos, int32_t* next) {
  if (argmax_head_) {
    int32_t best = -1;
    float best_v = 0.0f;
    for (size_t p = 0; p < part_sizes_.size(); ++p) {
      const int64_t idx = amax_idx_[p];
      // ANEMLL's argmax_idx is the index within its part (0.3.5's chat.py adds the part's offset).
      if (idx < 0 || idx >= part_sizes_[p])
        return fail(kBackendError, head_.label + ": argmax_idx[" + std::to_string(p) + "] = " + std::to_string(idx) +
                                       " is outside part " + std::to_string(p) + " (size " + std::to_string(part_sizes_[p]) + ")");
      const int64_t global = part_offsets_[p] + idx;
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
  const int64_t t0 = timing_on_ ? monotonic_ns() : 0;
  if (int rc = rewind_to(pos)) return rc;
  length_ = pos;  // on failure the cache stays valid up to pos - 1
  timing_step_ = timing_on_;  // the parts of this step read the clock (a rewind's rebuild above does not)
  int rc = run_infer(token, pos);
  if (rc == kOk) {
    history_[static_cast<size_t>(pos)] = token;
    length_ = pos + 1;
    rc = run_head_and_sample(pos, next);
  }
  timing_step_ = false;
  if (timing_on_ && rc == kOk) {
    timing_.total_ns += monotonic_ns() - t0;
    ++timing_.steps;
  }
  return rc;
}

}  // namespace anemll
