// A backend whose predictions return at once, leaving outputs untouched:
// it measures the engine's own host overhead.
#pragma once

#include "backends/backend_abi.h"

namespace anemll {

struct HostBuffers;

// A new null backend; release it with backend->destroy(backend->ctx) and delete.
// buffer_row_pad >= 0: it provides backend buffers (host_buffers.h) whose rows
// carry that many elements of padding.
anemll_backend* new_null_backend(int64_t buffer_row_pad = -1);
// Its buffer counters (NULL without buffers or for another backend).
const HostBuffers* null_backend_buffers(const anemll_backend* backend);

}  // namespace anemll

namespace anemll {
// Calls backend->destroy and deletes a backend made by new_*_backend.
void delete_backend(anemll_backend* backend);
}  // namespace anemll
