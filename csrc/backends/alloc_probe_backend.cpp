#include "backends/alloc_probe_backend.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <string>
#include <vector>

namespace anemll {
namespace {

// Sinks the compiler cannot see through: the planted allocations must really happen.
void* volatile g_sink_ptr = nullptr;
volatile size_t g_sink_size = 0;

struct ProbeCtx {
  AllocProbe mode;
};

struct Handle {
  int kind;
};
Handle g_model{1}, g_state{2};

// One output the backend keeps in its own memory, rows padded to 64 bytes as the Neural Engine pads them.
struct HeldOutput {
  unsigned char* dst = nullptr;  // the engine's dense buffer
  size_t row_bytes = 0;
  size_t pitch = 0;
  size_t rows = 0;
  std::vector<unsigned char> src;  // allocated at bind time, never in predict
};

struct ProbeBinding {
  std::vector<HeldOutput> outputs;
};

int probe_load(void*, const char*, const char*, anemll_model** out) {
  *out = reinterpret_cast<anemll_model*>(&g_model);
  return ANEMLL_OK;
}
int probe_make_state(void*, anemll_model*, anemll_state** out) {
  *out = reinterpret_cast<anemll_state*>(&g_state);
  return ANEMLL_OK;
}
int probe_reset_state(void*, anemll_state*) { return ANEMLL_OK; }

int probe_bind(void* ctx, anemll_model*, const anemll_tensor*, int32_t, const anemll_tensor* outputs,
               int32_t n_outputs, anemll_binding** out) {
  auto* b = new (std::nothrow) ProbeBinding();
  if (!b) return ANEMLL_ERR_NOMEM;
  if (static_cast<ProbeCtx*>(ctx)->mode == AllocProbe::kCopy) {
    uint32_t seed = 12345;
    for (int32_t i = 0; i < n_outputs; ++i) {
      const anemll_tensor& t = outputs[i];
      const size_t esz = anemll_dtype_size(t.dtype);
      const int64_t last = t.rank ? t.shape[t.rank - 1] : 1;
      HeldOutput h;
      h.dst = static_cast<unsigned char*>(t.data);
      h.row_bytes = static_cast<size_t>(last) * esz;
      h.pitch = (h.row_bytes + 63) / 64 * 64;
      h.rows = h.row_bytes ? t.nbytes / h.row_bytes : 0;
      h.src.assign(h.rows * h.pitch, 0);
      if (t.dtype == ANEMLL_DTYPE_FLOAT16) {
        // Distinct small fp16 values (exponent 0x38..0x3b, i.e. ~0.5..1.0): the samplers do real work.
        for (size_t r = 0; r < h.rows; ++r)
          for (int64_t j = 0; j < last; ++j) {
            seed = seed * 1664525u + 1013904223u;
            const uint16_t v = static_cast<uint16_t>(0x3800 | (seed >> 22));
            std::memcpy(&h.src[r * h.pitch + static_cast<size_t>(j) * 2], &v, 2);
          }
      }
      b->outputs.push_back(std::move(h));
    }
  }
  *out = reinterpret_cast<anemll_binding*>(b);
  return ANEMLL_OK;
}

int probe_predict(void* ctx, anemll_binding* binding, anemll_state*) {
  switch (static_cast<ProbeCtx*>(ctx)->mode) {
    case AllocProbe::kNone:
      break;
    case AllocProbe::kCopy:
      for (const HeldOutput& h : reinterpret_cast<ProbeBinding*>(binding)->outputs)
        for (size_t r = 0; r < h.rows; ++r) std::memcpy(h.dst + r * h.row_bytes, &h.src[r * h.pitch], h.row_bytes);
      break;
    case AllocProbe::kString: {
      std::string s(100, 'x');  // beyond the small-string buffer: operator new
      g_sink_size = s.size() + static_cast<size_t>(s[50]);
      break;
    }
    case AllocProbe::kMalloc: {
      g_sink_ptr = std::malloc(64);
      std::free(g_sink_ptr);
      break;
    }
    case AllocProbe::kStream: {
      std::ostringstream os;  // longer than the small-string buffer, so the stream's string grows
      os << "decode step " << 3.25 << " after " << g_sink_size << " bytes of history";
      g_sink_size = os.str().size();
      break;
    }
  }
  return ANEMLL_OK;
}

void probe_free_binding(void*, anemll_binding* binding) { delete reinterpret_cast<ProbeBinding*>(binding); }
void probe_free_state(void*, anemll_state*) {}
void probe_free_model(void*, anemll_model*) {}
const char* probe_last_error(void*) { return ""; }
void probe_destroy(void* ctx) { delete static_cast<ProbeCtx*>(ctx); }

}  // namespace

anemll_backend* new_alloc_probe_backend(int mode) {
  if (mode < 0 || mode > static_cast<int>(AllocProbe::kStream)) return nullptr;
  auto* ctx = new (std::nothrow) ProbeCtx{static_cast<AllocProbe>(mode)};
  auto* b = new (std::nothrow) anemll_backend();
  if (!ctx || !b) {
    delete ctx;
    delete b;
    return nullptr;
  }
  b->abi_version = ANEMLL_BACKEND_ABI_VERSION;
  b->struct_size = sizeof(anemll_backend);
  b->name = "alloc_probe";
  b->ctx = ctx;
  b->load = probe_load;
  b->make_state = probe_make_state;
  b->reset_state = probe_reset_state;
  b->bind = probe_bind;
  b->predict = probe_predict;
  b->free_binding = probe_free_binding;
  b->free_state = probe_free_state;
  b->free_model = probe_free_model;
  b->last_error = probe_last_error;
  b->destroy = probe_destroy;
  return b;
}

}  // namespace anemll
