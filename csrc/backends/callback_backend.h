// A backend forwarding every call to plain C hooks, through which the Cython
// layer reaches a Python object (`load`, `make_state`, `predict`). Handles are
// integer ids chosen by the hooks; the glue keeps the error message.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "backends/backend_abi.h"

namespace anemll {

// Each hook returns ANEMLL_OK or an anemll_status, and on failure writes a
// NUL-terminated message into err (capacity err_size).
struct CallbackHooks {
  void* user;
  int (*load)(void* user, const char* path, const char* function_name, int64_t* model_id,
              char* err, size_t err_size);
  int (*make_state)(void* user, int64_t model_id, int64_t* state_id, char* err, size_t err_size);
  int (*reset_state)(void* user, int64_t state_id, char* err, size_t err_size);
  int (*bind)(void* user, int64_t model_id, const anemll_tensor* inputs, int32_t n_inputs,
              const anemll_tensor* outputs, int32_t n_outputs, int64_t* binding_id, char* err,
              size_t err_size);
  // state_id < 0: no state.
  int (*predict)(void* user, int64_t binding_id, int64_t state_id, char* err, size_t err_size);
  // Copy state tensor `name` out of / into the state (dense, exactly nbytes).
  int (*read_state)(void* user, int64_t state_id, const char* name, void* dst, size_t nbytes, char* err,
                    size_t err_size);
  int (*write_state)(void* user, int64_t state_id, const char* name, const void* src, size_t nbytes, char* err,
                     size_t err_size);
  // kind: 0 model, 1 state, 2 binding.
  void (*release)(void* user, int kind, int64_t id);
  int (*copy_state)(void* user, int64_t src_id, int64_t dst_id, char* err, size_t err_size);
};

struct HostBuffers;

// A new callback backend over `hooks`; release with backend->destroy(ctx) then delete.
// buffer_row_pad >= 0: it provides backend buffers with padded rows (host_buffers.h).
anemll_backend* new_callback_backend(const CallbackHooks& hooks, int64_t buffer_row_pad = -1);
// Its buffer counters (NULL without buffers or for another backend).
const HostBuffers* callback_backend_buffers(const anemll_backend* backend);

// The id the hooks chose for a model, state or binding handle of a callback backend (-1 for NULL).
int64_t callback_handle_id(const void* handle);

}  // namespace anemll
