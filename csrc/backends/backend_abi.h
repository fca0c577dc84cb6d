/* The C ABI between the anemll_fast engine and its backends.
 *
 * A backend implements the few calls of `anemll_backend` below. The engine:
 *   1. loads one function of one model file per pipeline component (`load`),
 *   2. makes the KV-cache state once (`make_state`), shared by every model
 *      whose state specs are identical,
 *   3. binds each model once to the engine's own buffers (`bind`): the
 *      buffers keep their address until `free_binding`, the engine rewrites
 *      inputs in place between calls and reads outputs in place after them,
 *   4. calls `predict` on a binding, with a state or NULL, as often as needed,
 *   5. frees everything in reverse order and finally calls `destroy`.
 * Models converted for several context sizes (ANEMLL's infer_ctx{N}) have one
 * state per size; `copy_state` moves the cache between them.
 * A model may be bound several times (e.g. embeddings at [1,1] and [1,batch]).
 * A backend may also provide the memory of the tensors passed between models
 * and of the logits (alloc_buffer below, optional): the engine then binds that
 * memory, so that an accelerator writes each part's output where the next part
 * reads it, and reads logits in place between map_buffer and unmap_buffer.
 *
 * Every call returning int returns ANEMLL_OK (0) or an anemll_status; the
 * message of the last failure is then `last_error(ctx)` (valid until the next
 * call on the same backend). No call may throw a C++ or Objective-C exception
 * or longjmp across this boundary. The engine calls a backend from one thread
 * at a time and possibly without holding the Python GIL.
 */
#ifndef ANEMLL_FAST_BACKEND_ABI_H
#define ANEMLL_FAST_BACKEND_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ANEMLL_BACKEND_ABI_VERSION 1
#define ANEMLL_MAX_RANK 8

typedef enum anemll_dtype {
  ANEMLL_DTYPE_FLOAT16 = 1,
  ANEMLL_DTYPE_FLOAT32 = 2,
  ANEMLL_DTYPE_FLOAT64 = 3,
  ANEMLL_DTYPE_INT32 = 4,
  ANEMLL_DTYPE_INT16 = 5,
  ANEMLL_DTYPE_INT8 = 6,
  ANEMLL_DTYPE_UINT8 = 7,
  ANEMLL_DTYPE_BOOL = 8
} anemll_dtype;

typedef enum anemll_status {
  ANEMLL_OK = 0,
  ANEMLL_ERR_LOAD = 1,        /* file missing, unreadable, unknown function */
  ANEMLL_ERR_INVALID = 2,     /* bad argument: unknown tensor, shape or dtype mismatch */
  ANEMLL_ERR_PREDICT = 3,     /* the prediction itself failed */
  ANEMLL_ERR_UNSUPPORTED = 4, /* e.g. states on an OS that lacks them */
  ANEMLL_ERR_NOMEM = 5
} anemll_status;

/* One tensor bound to a model: the engine owns `data` (page-aligned).
 * Strides are in elements; the engine always passes dense row-major strides,
 * a backend reading its own outputs must honour its own strides. */
typedef struct anemll_tensor {
  const char* name;
  int32_t dtype; /* anemll_dtype */
  int32_t rank;
  int64_t shape[ANEMLL_MAX_RANK];
  int64_t strides[ANEMLL_MAX_RANK];
  void* data;
  size_t nbytes;
} anemll_tensor;

/* Opaque handles, defined by each backend. */
typedef struct anemll_model anemll_model;
typedef struct anemll_state anemll_state;
typedef struct anemll_binding anemll_binding;
typedef struct anemll_buffer anemll_buffer;

typedef struct anemll_backend {
  uint32_t abi_version; /* ANEMLL_BACKEND_ABI_VERSION */
  uint32_t struct_size; /* sizeof(anemll_backend), for forward compatibility */
  const char* name;     /* "null", "callback", "coreml", ... */
  void* ctx;            /* backend-wide context passed to every call */

  /* Load `function_name` (NULL: the default function) of the model at `path`. */
  int (*load)(void* ctx, const char* path, const char* function_name, anemll_model** out);
  /* A fresh state (KV cache) for `model`; may be used with other models that
   * declare the same state specs. */
  int (*make_state)(void* ctx, anemll_model* model, anemll_state** out);
  /* Zero the state in place (a new conversation) without reloading. */
  int (*reset_state)(void* ctx, anemll_state* state);
  /* Bind the model's inputs and outputs to engine buffers (copied descriptors;
   * the data pointers must stay valid until free_binding). */
  int (*bind)(void* ctx, anemll_model* model, const anemll_tensor* inputs, int32_t n_inputs,
              const anemll_tensor* outputs, int32_t n_outputs, anemll_binding** out);
  /* Run the model on the bound buffers; `state` may be NULL for stateless models.
   * On success every bound output buffer holds the result. */
  int (*predict)(void* ctx, anemll_binding* binding, anemll_state* state);

  void (*free_binding)(void* ctx, anemll_binding* binding);
  void (*free_state)(void* ctx, anemll_state* state);
  void (*free_model)(void* ctx, anemll_model* model);
  /* Message of the last failed call (never NULL). */
  const char* (*last_error)(void* ctx);
  /* Release the backend context itself. */
  void (*destroy)(void* ctx);

  /* Optional: present when struct_size covers them and they are not NULL.
   * Memory for a tensor the engine passes from one model to the next or reads
   * after a prediction, allocated where the accelerator writes natively (Core
   * ML: an IOSurface-backed pixel buffer). `t` gives name, dtype, rank and
   * shape; the backend fills t->strides (elements; rows may be padded, the last
   * stride is 1), t->data and t->nbytes. ANEMLL_OK with *out NULL: nothing
   * special for this tensor, the engine uses its own memory. The engine binds
   * t->data with exactly these strides wherever the tensor goes (the backend
   * recognises it by address), writes it never, and touches it on the host
   * only between map_buffer (which gives the address to use, possibly another
   * than t->data) and unmap_buffer, which must not allocate. A buffer outlives
   * every binding that uses it. */
  int (*alloc_buffer)(void* ctx, anemll_tensor* t, anemll_buffer** out);
  int (*map_buffer)(void* ctx, anemll_buffer* buffer, void** data);
  void (*unmap_buffer)(void* ctx, anemll_buffer* buffer);
  void (*free_buffer)(void* ctx, anemll_buffer* buffer);
  /* Copy every state of `dst` from the state of the same name in `src`, over the
   * leading part of each dimension both have (the KV-cache length may differ:
   * a context switch). Optional like the buffer calls: check struct_size, may be NULL. */
  int (*copy_state)(void* ctx, anemll_state* src, anemll_state* dst);

  /* Optional (NULL: unsupported; present only when struct_size covers them):
   * copy the state tensor `name` of `state` out into `dst`, or in from `src`,
   * dense row-major in its declared dtype, exactly `nbytes` bytes. A KV
   * cache is saved and restored through these. */
  int (*read_state)(void* ctx, anemll_state* state, const char* name, void* dst, size_t nbytes);
  int (*write_state)(void* ctx, anemll_state* state, const char* name, const void* src, size_t nbytes);
} anemll_backend;

/* Whether `b` provides buffers (alloc_buffer and its companions). */
static inline int anemll_backend_has_buffers(const anemll_backend* b) {
  return b->struct_size >= offsetof(anemll_backend, free_buffer) + sizeof(b->free_buffer) && b->alloc_buffer &&
         b->map_buffer && b->unmap_buffer && b->free_buffer;
}

/* Whether `b` can copy state tensors out and in (read_state, write_state). */
static inline int anemll_backend_has_state_io(const anemll_backend* b) {
  return b->struct_size >= offsetof(anemll_backend, write_state) + sizeof(b->write_state) && b->read_state &&
         b->write_state;
}

/* Size in bytes of one element of `dtype`, 0 if unknown. */
static inline size_t anemll_dtype_size(int32_t dtype) {
  switch (dtype) {
    case ANEMLL_DTYPE_FLOAT16: return 2;
    case ANEMLL_DTYPE_FLOAT32: return 4;
    case ANEMLL_DTYPE_FLOAT64: return 8;
    case ANEMLL_DTYPE_INT32: return 4;
    case ANEMLL_DTYPE_INT16: return 2;
    case ANEMLL_DTYPE_INT8: return 1;
    case ANEMLL_DTYPE_UINT8: return 1;
    case ANEMLL_DTYPE_BOOL: return 1;
    default: return 0;
  }
}

/* Name of `dtype` for messages, as ModelConfig spells it. */
static inline const char* anemll_dtype_name(int32_t dtype) {
  switch (dtype) {
    case ANEMLL_DTYPE_FLOAT16: return "FLOAT16";
    case ANEMLL_DTYPE_FLOAT32: return "FLOAT32";
    case ANEMLL_DTYPE_FLOAT64: return "FLOAT64";
    case ANEMLL_DTYPE_INT32: return "INT32";
    case ANEMLL_DTYPE_INT16: return "INT16";
    case ANEMLL_DTYPE_INT8: return "INT8";
    case ANEMLL_DTYPE_UINT8: return "UINT8";
    case ANEMLL_DTYPE_BOOL: return "BOOL";
    default: return "UNKNOWN";
  }
}

#ifdef __cplusplus
}
#endif

#endif /* ANEMLL_FAST_BACKEND_ABI_H */
