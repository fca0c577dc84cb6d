// Copying one tensor into another of the same logical shape, each with its own
// element strides and dtype: how the Core ML backend moves an output that Core
// ML kept in its own memory (the ANE pads rows; fp16 may come back as fp32)
// into the engine's dense buffer, exactly once.
//
// Shapes are compared with size-1 dimensions removed, so [1, 1, H] fills [1, H].
// Floating types convert among themselves (fp16 <-> fp32 <-> fp64); int32 only
// copies to int32.
//
// Allocation-free by design: a copy runs on every decode step, so layouts are
// fixed-size arrays (rank <= ANEMLL_MAX_RANK), messages go to a caller's char
// buffer, and plan() and run() never touch the heap nor throw. The backend
// builds a plan once at bind time where the source layout is known (pixel
// buffers), else per call from the returned array's shape and strides.
// Portable C++17, header-only: used by coreml_backend.mm and compiled on its
// own (with the allocation hook) by tests/test_coreml_package_cache.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backends/backend_abi.h"
#include "engine/fp16.h"

namespace anemll {
namespace coreml_copy {

// One side of a copy: where the elements are and how they are laid out.
struct Layout {
  int32_t dtype = 0;  // anemll_dtype
  int32_t rank = 0;
  int64_t shape[ANEMLL_MAX_RANK] = {};    // logical shape
  int64_t strides[ANEMLL_MAX_RANK] = {};  // in elements, >= 0
  size_t nbytes = 0;                      // bytes addressable from the data pointer
};

// A checked copy, ready to run: squeezed shape and both sides' strides.
struct Plan {
  int32_t src_dtype = 0, dst_dtype = 0;
  int32_t rank = 0;  // after squeezing; >= 1 unless empty
  bool empty = false;
  int64_t shape[ANEMLL_MAX_RANK] = {};
  int64_t src_strides[ANEMLL_MAX_RANK] = {};
  int64_t dst_strides[ANEMLL_MAX_RANK] = {};
};

inline bool is_float(int32_t d) {
  return d == ANEMLL_DTYPE_FLOAT16 || d == ANEMLL_DTYPE_FLOAT32 || d == ANEMLL_DTYPE_FLOAT64;
}

// Whether a copy can convert src dtype into dst dtype.
inline bool convertible(int32_t src, int32_t dst) {
  return (is_float(src) && is_float(dst)) || (src == ANEMLL_DTYPE_INT32 && dst == ANEMLL_DTYPE_INT32);
}

// For messages built at bind time (allocates).
inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// A layout from a descriptor; false when the rank does not fit.
inline bool make_layout(int32_t dtype, const int64_t* shape, const int64_t* strides, int32_t rank, size_t nbytes,
                        Layout* out) noexcept {
  if (rank < 0 || rank > ANEMLL_MAX_RANK) return false;
  out->dtype = dtype;
  out->rank = rank;
  out->nbytes = nbytes;
  for (int32_t i = 0; i < rank; ++i) {
    out->shape[i] = shape[i];
    out->strides[i] = strides[i];
  }
  return true;
}

namespace detail {

// "[a, b, c]" into buf, never allocating.
inline void format_shape(char* buf, size_t size, const int64_t* shape, int32_t rank) noexcept {
  if (size == 0) return;
  size_t n = 0;
  buf[0] = '\0';
  auto put = [&](const char* s) {
    const int w = std::snprintf(buf + n, size - n, "%s", s);
    if (w > 0) n = n + static_cast<size_t>(w) < size ? n + static_cast<size_t>(w) : size - 1;
  };
  put("[");
  for (int32_t i = 0; i < rank; ++i) {
    char num[32];
    std::snprintf(num, sizeof num, i ? ", %lld" : "%lld", static_cast<long long>(shape[i]));
    put(num);
  }
  put("]");
}

inline double load(const unsigned char* p, int32_t dtype) noexcept {
  switch (dtype) {
    case ANEMLL_DTYPE_FLOAT16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return half_to_float(h);
    }
    case ANEMLL_DTYPE_FLOAT32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    default: {  // FLOAT64
      double d;
      std::memcpy(&d, p, 8);
      return d;
    }
  }
}

inline void store(unsigned char* p, int32_t dtype, double v) noexcept {
  switch (dtype) {
    case ANEMLL_DTYPE_FLOAT16: {
      const uint16_t h = float_to_half(static_cast<float>(v));
      std::memcpy(p, &h, 2);
      break;
    }
    case ANEMLL_DTYPE_FLOAT32: {
      const float f = static_cast<float>(v);
      std::memcpy(p, &f, 4);
      break;
    }
    default: {
      std::memcpy(p, &v, 8);
      break;
    }
  }
}

// Dimensions other than size 1, with their strides; returns the new rank.
inline int32_t squeeze(const Layout& t, int64_t* shape, int64_t* strides) noexcept {
  int32_t r = 0;
  for (int32_t i = 0; i < t.rank; ++i)
    if (t.shape[i] != 1) {
      shape[r] = t.shape[i];
      strides[r] = t.strides[i];
      ++r;
    }
  return r;
}

// Largest element offset reachable, +1 (0 for an empty tensor).
inline int64_t extent(const int64_t* shape, const int64_t* strides, int32_t rank) noexcept {
  int64_t last = 0;
  for (int32_t i = 0; i < rank; ++i) {
    if (shape[i] == 0) return 0;
    last += (shape[i] - 1) * strides[i];
  }
  return last + 1;
}

inline bool fail(char* err, size_t size, const char* what, const char* msg) noexcept {
  if (err && size) std::snprintf(err, size, "%s: %s", what, msg);
  return false;
}

}  // namespace detail

// Checks that src fits dst (same logical shape up to size-1 dims, convertible
// dtypes, strides inside both buffers) and prepares the copy. Returns false with
// a message naming `what` in err.
inline bool plan(const Layout& src, const Layout& dst, const char* what, Plan* out, char* err,
                 size_t err_size) noexcept {
  const size_t ssz = anemll_dtype_size(src.dtype), dsz = anemll_dtype_size(dst.dtype);
  if (!convertible(src.dtype, dst.dtype)) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "cannot convert %s into %s", anemll_dtype_name(src.dtype),
                  anemll_dtype_name(dst.dtype));
    return detail::fail(err, err_size, what, msg);
  }
  if (src.rank < 0 || src.rank > ANEMLL_MAX_RANK || dst.rank < 0 || dst.rank > ANEMLL_MAX_RANK)
    return detail::fail(err, err_size, what, "rank outside [0, 8]");
  for (int32_t i = 0; i < src.rank; ++i) {
    if (src.strides[i] < 0) return detail::fail(err, err_size, what, "negative source stride");
    if (src.shape[i] < 0) return detail::fail(err, err_size, what, "negative source dimension");
  }
  for (int32_t i = 0; i < dst.rank; ++i)
    if (dst.strides[i] < 0) return detail::fail(err, err_size, what, "negative destination stride");
  Plan p;
  p.src_dtype = src.dtype;
  p.dst_dtype = dst.dtype;
  int64_t d_shape[ANEMLL_MAX_RANK];
  p.rank = detail::squeeze(src, p.shape, p.src_strides);
  const int32_t d_rank = detail::squeeze(dst, d_shape, p.dst_strides);
  bool same = p.rank == d_rank;
  for (int32_t i = 0; same && i < p.rank; ++i) same = p.shape[i] == d_shape[i];
  if (!same) {
    char a[160], b[160], msg[400];
    detail::format_shape(a, sizeof a, src.shape, src.rank);
    detail::format_shape(b, sizeof b, dst.shape, dst.rank);
    std::snprintf(msg, sizeof msg, "the model produced shape %s, the engine expects %s", a, b);
    return detail::fail(err, err_size, what, msg);
  }
  const int64_t s_ext = detail::extent(p.shape, p.src_strides, p.rank);
  const int64_t d_ext = detail::extent(p.shape, p.dst_strides, p.rank);
  if (static_cast<uint64_t>(s_ext) * ssz > src.nbytes) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "source strides reach past its %llu bytes",
                  static_cast<unsigned long long>(src.nbytes));
    return detail::fail(err, err_size, what, msg);
  }
  if (static_cast<uint64_t>(d_ext) * dsz > dst.nbytes) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "destination strides reach past its %llu bytes",
                  static_cast<unsigned long long>(dst.nbytes));
    return detail::fail(err, err_size, what, msg);
  }
  p.empty = s_ext == 0;
  if (p.rank == 0) {  // a single element
    p.rank = 1;
    p.shape[0] = 1;
    p.src_strides[0] = p.dst_strides[0] = 1;
  }
  *out = p;
  return true;
}

// Runs a plan: src and dst are the data pointers the layouts described.
inline void run(const Plan& p, const void* src, void* dst) noexcept {
  if (p.empty) return;
  const size_t ssz = anemll_dtype_size(p.src_dtype), dsz = anemll_dtype_size(p.dst_dtype);
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  const int32_t rank = p.rank;
  const int64_t inner = p.shape[rank - 1];
  const int64_t s_in = p.src_strides[rank - 1], d_in = p.dst_strides[rank - 1];
  const bool same = p.src_dtype == p.dst_dtype;
  const bool rows_contiguous = same && s_in == 1 && d_in == 1;
  int64_t idx[ANEMLL_MAX_RANK] = {};
  for (;;) {
    int64_t so = 0, dof = 0;
    for (int32_t k = 0; k + 1 < rank; ++k) {
      so += idx[k] * p.src_strides[k];
      dof += idx[k] * p.dst_strides[k];
    }
    if (rows_contiguous) {
      std::memcpy(d + dof * dsz, s + so * ssz, static_cast<size_t>(inner) * ssz);
    } else if (same) {
      for (int64_t j = 0; j < inner; ++j) std::memcpy(d + (dof + j * d_in) * dsz, s + (so + j * s_in) * ssz, ssz);
    } else {
      for (int64_t j = 0; j < inner; ++j)
        detail::store(d + (dof + j * d_in) * dsz, p.dst_dtype, detail::load(s + (so + j * s_in) * ssz, p.src_dtype));
    }
    // Next row: odometer over all but the last dimension.
    int32_t k = rank - 1;
    for (;;) {
      if (k == 0) return;
      --k;
      if (++idx[k] < p.shape[k]) break;
      idx[k] = 0;
    }
  }
}

// plan() then run(): for callers without a reusable plan.
inline bool copy(const Layout& src, const void* src_data, const Layout& dst, void* dst_data, const char* what,
                 char* err, size_t err_size) noexcept {
  Plan p;
  if (!plan(src, dst, what, &p, err, err_size)) return false;
  run(p, src_data, dst_data);
  return true;
}

}  // namespace coreml_copy
}  // namespace anemll
