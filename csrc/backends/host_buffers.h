// Backend buffers (backend_abi.h alloc_buffer) in host memory with padded rows:
// the stand-in, on every platform, for the Core ML backend's IOSurface-backed
// pixel buffers (rows bytesPerRow apart, readable only while locked), so that
// the engine's use of backend memory runs in tests here. Padding is filled with
// the largest finite fp16 value: a reader that strays into it picks it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "backends/backend_abi.h"

namespace anemll {

struct HostBuffers {
  int64_t row_pad = 0;  // elements of padding after every row
  uint64_t allocs = 0, frees = 0, maps = 0, unmaps = 0;
  int64_t mapped = 0;   // maps not yet unmapped
};

int host_alloc_buffer(HostBuffers* hb, anemll_tensor* t, anemll_buffer** out);
int host_map_buffer(HostBuffers* hb, anemll_buffer* b, void** data);
void host_unmap_buffer(HostBuffers* hb, anemll_buffer* b);
void host_free_buffer(HostBuffers* hb, anemll_buffer* b);

}  // namespace anemll
