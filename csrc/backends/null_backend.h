// A backend whose predictions return at once, leaving outputs untouched:
// it measures the engine's own host overhead.
#pragma once

#include "backends/backend_abi.h"

namespace anemll {

// A new null backend; release it with backend->destroy(backend->ctx) and delete.
anemll_backend* new_null_backend();

}  // namespace anemll

namespace anemll {
// Calls backend->destroy and deletes a backend made by new_*_backend.
void delete_backend(anemll_backend* backend);
}  // namespace anemll
