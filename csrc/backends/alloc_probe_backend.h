// Test-only backend for the process-wide allocation counter (tests/test_alloc_process.py): behaves as the
// null backend, except that predict can allocate on purpose (the negative controls) or copy outputs it keeps
// in its own padded buffers into the engine's bound buffers (the copy path a real backend takes). It is never
// used by the engine's own code paths.
#pragma once

#include "backends/backend_abi.h"

namespace anemll {

enum class AllocProbe : int {
  kNone = 0,       // nothing per predict
  kCopy = 1,       // copy backend-held outputs (rows padded to 64 bytes) into the bound buffers
  kString = 2,     // a std::string built in predict (negative control)
  kMalloc = 3,     // malloc/free in predict (negative control)
  kStream = 4,     // an ostringstream in predict (negative control)
};

// A new probe backend, or nullptr for an unknown mode or on allocation failure.
anemll_backend* new_alloc_probe_backend(int mode);

}  // namespace anemll
