#include "backends/callback_backend.h"

#include <cstdio>
#include <cstring>
#include <new>

#include "backends/host_buffers.h"

namespace anemll {
namespace {

struct Ctx {
  CallbackHooks hooks;
  HostBuffers buffers;
  // Fixed buffer: reporting an error must not allocate.
  char err[2048];
};

struct Handle {
  int64_t id;
};

Ctx* as_ctx(void* c) { return static_cast<Ctx*>(c); }

int64_t id_of(const void* h) { return h ? static_cast<const Handle*>(h)->id : -1; }

template <class T>
int wrap(Ctx* c, int rc, int64_t id, int kind, T** out) {
  if (rc != ANEMLL_OK) {
    if (c->err[0] == '\0') std::snprintf(c->err, sizeof c->err, "callback backend error %d", rc);
    return rc;
  }
  auto* h = new (std::nothrow) Handle{id};
  if (!h) {
    c->hooks.release(c->hooks.user, kind, id);
    std::snprintf(c->err, sizeof c->err, "out of memory");
    return ANEMLL_ERR_NOMEM;
  }
  *out = reinterpret_cast<T*>(h);
  return ANEMLL_OK;
}

int cb_load(void* ctx, const char* path, const char* fn, anemll_model** out) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int64_t id = -1;
  int rc = c->hooks.load(c->hooks.user, path, fn, &id, c->err, sizeof c->err);
  return wrap(c, rc, id, 0, out);
}

int cb_make_state(void* ctx, anemll_model* model, anemll_state** out) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int64_t id = -1;
  int rc = c->hooks.make_state(c->hooks.user, id_of(model), &id, c->err, sizeof c->err);
  return wrap(c, rc, id, 1, out);
}

int cb_reset_state(void* ctx, anemll_state* state) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int rc = c->hooks.reset_state(c->hooks.user, id_of(state), c->err, sizeof c->err);
  if (rc != ANEMLL_OK && c->err[0] == '\0') std::snprintf(c->err, sizeof c->err, "reset_state failed");
  return rc;
}

int cb_bind(void* ctx, anemll_model* model, const anemll_tensor* in, int32_t n_in,
            const anemll_tensor* out_t, int32_t n_out, anemll_binding** out) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int64_t id = -1;
  int rc = c->hooks.bind(c->hooks.user, id_of(model), in, n_in, out_t, n_out, &id, c->err,
                         sizeof c->err);
  return wrap(c, rc, id, 2, out);
}

int cb_predict(void* ctx, anemll_binding* binding, anemll_state* state) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int rc = c->hooks.predict(c->hooks.user, id_of(binding), id_of(state), c->err, sizeof c->err);
  if (rc != ANEMLL_OK && c->err[0] == '\0') std::snprintf(c->err, sizeof c->err, "predict failed");
  return rc;
}

int cb_copy_state(void* ctx, anemll_state* src, anemll_state* dst) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int rc = c->hooks.copy_state(c->hooks.user, id_of(src), id_of(dst), c->err, sizeof c->err);
  if (rc != ANEMLL_OK && c->err[0] == '\0') std::snprintf(c->err, sizeof c->err, "copy_state failed");
  return rc;
}

int cb_read_state(void* ctx, anemll_state* state, const char* name, void* dst, size_t nbytes) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int rc = c->hooks.read_state(c->hooks.user, id_of(state), name, dst, nbytes, c->err, sizeof c->err);
  if (rc != ANEMLL_OK && c->err[0] == '\0') std::snprintf(c->err, sizeof c->err, "read_state failed");
  return rc;
}

int cb_write_state(void* ctx, anemll_state* state, const char* name, const void* src, size_t nbytes) {
  Ctx* c = as_ctx(ctx);
  c->err[0] = '\0';
  int rc = c->hooks.write_state(c->hooks.user, id_of(state), name, src, nbytes, c->err, sizeof c->err);
  if (rc != ANEMLL_OK && c->err[0] == '\0') std::snprintf(c->err, sizeof c->err, "write_state failed");
  return rc;
}

void release(void* ctx, int kind, void* h) {
  if (!h) return;
  Ctx* c = as_ctx(ctx);
  c->hooks.release(c->hooks.user, kind, id_of(h));
  delete static_cast<Handle*>(h);
}

void cb_free_binding(void* ctx, anemll_binding* b) { release(ctx, 2, b); }
void cb_free_state(void* ctx, anemll_state* s) { release(ctx, 1, s); }
void cb_free_model(void* ctx, anemll_model* m) { release(ctx, 0, m); }
const char* cb_last_error(void* ctx) { return as_ctx(ctx)->err; }
void cb_destroy(void* ctx) { delete as_ctx(ctx); }
int cb_alloc_buffer(void* ctx, anemll_tensor* t, anemll_buffer** out) {
  return host_alloc_buffer(&as_ctx(ctx)->buffers, t, out);
}
int cb_map_buffer(void* ctx, anemll_buffer* b, void** data) { return host_map_buffer(&as_ctx(ctx)->buffers, b, data); }
void cb_unmap_buffer(void* ctx, anemll_buffer* b) { host_unmap_buffer(&as_ctx(ctx)->buffers, b); }
void cb_free_buffer(void* ctx, anemll_buffer* b) { host_free_buffer(&as_ctx(ctx)->buffers, b); }

}  // namespace

const HostBuffers* callback_backend_buffers(const anemll_backend* backend) {
  return backend && backend->destroy == cb_destroy && backend->alloc_buffer ? &as_ctx(backend->ctx)->buffers : nullptr;
}

anemll_backend* new_callback_backend(const CallbackHooks& hooks, int64_t buffer_row_pad) {
  auto* c = new (std::nothrow) Ctx();
  auto* b = new (std::nothrow) anemll_backend();
  if (!c || !b) {
    delete c;
    delete b;
    return nullptr;
  }
  c->hooks = hooks;
  c->err[0] = '\0';
  b->abi_version = ANEMLL_BACKEND_ABI_VERSION;
  b->struct_size = sizeof(anemll_backend);
  b->name = "callback";
  b->ctx = c;
  b->load = cb_load;
  b->make_state = cb_make_state;
  b->reset_state = cb_reset_state;
  b->bind = cb_bind;
  b->predict = cb_predict;
  b->free_binding = cb_free_binding;
  b->free_state = cb_free_state;
  b->free_model = cb_free_model;
  b->last_error = cb_last_error;
  b->destroy = cb_destroy;
  if (buffer_row_pad >= 0) {
    c->buffers.row_pad = buffer_row_pad;
    b->alloc_buffer = cb_alloc_buffer;
    b->map_buffer = cb_map_buffer;
    b->unmap_buffer = cb_unmap_buffer;
    b->free_buffer = cb_free_buffer;
  }
  b->copy_state = hooks.copy_state ? cb_copy_state : nullptr;
  b->read_state = hooks.read_state ? cb_read_state : nullptr;
  b->write_state = hooks.write_state ? cb_write_state : nullptr;
  return b;
}

int64_t callback_handle_id(const void* handle) { return id_of(handle); }

}  // namespace anemll
