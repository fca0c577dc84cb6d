#include "backends/null_backend.h"

#include <new>

#include "backends/host_buffers.h"

namespace anemll {
namespace {

// Distinct non-null handles so that the engine can tell them apart.
struct NullHandle {
  int kind;
};
NullHandle g_model{1}, g_state{2}, g_binding{3};

int null_load(void*, const char*, const char*, anemll_model** out) {
  *out = reinterpret_cast<anemll_model*>(&g_model);
  return ANEMLL_OK;
}
int null_make_state(void*, anemll_model*, anemll_state** out) {
  *out = reinterpret_cast<anemll_state*>(&g_state);
  return ANEMLL_OK;
}
int null_reset_state(void*, anemll_state*) { return ANEMLL_OK; }
int null_bind(void*, anemll_model*, const anemll_tensor*, int32_t, const anemll_tensor*, int32_t,
              anemll_binding** out) {
  *out = reinterpret_cast<anemll_binding*>(&g_binding);
  return ANEMLL_OK;
}
int null_predict(void*, anemll_binding*, anemll_state*) { return ANEMLL_OK; }
void null_free_binding(void*, anemll_binding*) {}
void null_free_state(void*, anemll_state*) {}
int null_copy_state(void*, anemll_state*, anemll_state*) { return ANEMLL_OK; }
void null_free_model(void*, anemll_model*) {}
const char* null_last_error(void*) { return ""; }
void null_destroy(void* ctx) { delete static_cast<HostBuffers*>(ctx); }

// With buffers, ctx is the HostBuffers.
HostBuffers* hb_of(void* ctx) { return static_cast<HostBuffers*>(ctx); }
int null_alloc_buffer(void* ctx, anemll_tensor* t, anemll_buffer** out) { return host_alloc_buffer(hb_of(ctx), t, out); }
int null_map_buffer(void* ctx, anemll_buffer* b, void** data) { return host_map_buffer(hb_of(ctx), b, data); }
void null_unmap_buffer(void* ctx, anemll_buffer* b) { host_unmap_buffer(hb_of(ctx), b); }
void null_free_buffer(void* ctx, anemll_buffer* b) { host_free_buffer(hb_of(ctx), b); }

}  // namespace

anemll_backend* new_null_backend(int64_t buffer_row_pad) {
  auto* b = new (std::nothrow) anemll_backend();
  if (!b) return nullptr;
  if (buffer_row_pad >= 0) {
    auto* hb = new (std::nothrow) HostBuffers();
    if (!hb) {
      delete b;
      return nullptr;
    }
    hb->row_pad = buffer_row_pad;
    b->ctx = hb;
    b->alloc_buffer = null_alloc_buffer;
    b->map_buffer = null_map_buffer;
    b->unmap_buffer = null_unmap_buffer;
    b->free_buffer = null_free_buffer;
  }
  b->abi_version = ANEMLL_BACKEND_ABI_VERSION;
  b->struct_size = sizeof(anemll_backend);
  b->name = "null";
  b->load = null_load;
  b->make_state = null_make_state;
  b->reset_state = null_reset_state;
  b->copy_state = null_copy_state;
  b->bind = null_bind;
  b->predict = null_predict;
  b->free_binding = null_free_binding;
  b->free_state = null_free_state;
  b->free_model = null_free_model;
  b->last_error = null_last_error;
  b->destroy = null_destroy;
  return b;
}

}  // namespace anemll

namespace anemll {
const HostBuffers* null_backend_buffers(const anemll_backend* backend) {
  return backend && backend->destroy == null_destroy ? static_cast<const HostBuffers*>(backend->ctx) : nullptr;
}

void delete_backend(anemll_backend* backend) {
  if (!backend) return;
  if (backend->destroy) backend->destroy(backend->ctx);
  delete backend;
}
}  // namespace anemll
