#include "backends/host_buffers.h"

#include <cstdlib>
#include <cstring>

namespace anemll {
namespace {

struct HostBuffer {
  void* data;
};

}  // namespace

int host_alloc_buffer(HostBuffers* hb, anemll_tensor* t, anemll_buffer** out) {
  *out = nullptr;
  const size_t es = anemll_dtype_size(t->dtype);
  if (es == 0 || t->rank < 1 || t->rank > ANEMLL_MAX_RANK) return ANEMLL_ERR_INVALID;
  // Row-major over rows of shape[-1] elements padded to shape[-1] + row_pad.
  int64_t stride = t->shape[t->rank - 1] + hb->row_pad;
  t->strides[t->rank - 1] = 1;
  for (int32_t i = t->rank - 2; i >= 0; --i) {
    t->strides[i] = stride;
    stride *= t->shape[i];
  }
  const size_t nbytes = static_cast<size_t>(stride) * es;
  void* data = std::malloc(nbytes ? nbytes : 1);
  auto* b = static_cast<HostBuffer*>(std::malloc(sizeof(HostBuffer)));
  if (!data || !b) {
    std::free(data);
    std::free(b);
    return ANEMLL_ERR_NOMEM;
  }
  if (es == 2) {
    const uint16_t max_half = 0x7BFFu;  // 65504
    for (size_t i = 0; i < nbytes / 2; ++i) std::memcpy(static_cast<char*>(data) + 2 * i, &max_half, 2);
  } else {
    std::memset(data, 0x7F, nbytes);
  }
  b->data = data;
  t->data = data;
  t->nbytes = nbytes;
  hb->allocs++;
  *out = reinterpret_cast<anemll_buffer*>(b);
  return ANEMLL_OK;
}

int host_map_buffer(HostBuffers* hb, anemll_buffer* b, void** data) {
  *data = reinterpret_cast<HostBuffer*>(b)->data;
  hb->maps++;
  hb->mapped++;
  return ANEMLL_OK;
}

void host_unmap_buffer(HostBuffers* hb, anemll_buffer*) {
  hb->unmaps++;
  hb->mapped--;
}

void host_free_buffer(HostBuffers* hb, anemll_buffer* b) {
  if (!b) return;
  std::free(reinterpret_cast<HostBuffer*>(b)->data);
  std::free(b);
  hb->frees++;
}

}  // namespace anemll
