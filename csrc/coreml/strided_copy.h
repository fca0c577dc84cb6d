// Copying one tensor into another of the same logical shape, each with its own
// element strides and dtype: how the Core ML backend moves an output that Core
// ML kept in its own memory (the ANE pads rows; fp16 may come back as fp32)
// into the engine's dense buffer, exactly once.
//
// Shapes are compared with size-1 dimensions removed, so [1, 1, H] fills [1, H].
// Floating types convert among themselves (fp16 <-> fp32 <-> fp64); int32 only
// copies to int32. Portable C++17, header-only: used by coreml_backend.mm and
// compiled on its own by tests/test_coreml_package_cache.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backends/backend_abi.h"
#include "engine/fp16.h"

namespace anemll {
namespace coreml_copy {

struct Tensor {
  const void* data = nullptr;
  int32_t dtype = 0;             // anemll_dtype
  std::vector<int64_t> shape;    // logical shape
  std::vector<int64_t> strides;  // in elements, >= 0
  size_t nbytes = 0;             // bytes addressable from data
};

inline bool is_float(int32_t d) {
  return d == ANEMLL_DTYPE_FLOAT16 || d == ANEMLL_DTYPE_FLOAT32 || d == ANEMLL_DTYPE_FLOAT64;
}

// Whether copy() can convert src dtype into dst dtype.
inline bool convertible(int32_t src, int32_t dst) {
  return (is_float(src) && is_float(dst)) || (src == ANEMLL_DTYPE_INT32 && dst == ANEMLL_DTYPE_INT32);
}

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

namespace detail {

inline double load(const unsigned char* p, int32_t dtype) {
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

inline void store(unsigned char* p, int32_t dtype, double v) {
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

// Dimensions other than size 1, with their strides.
inline void squeeze(const Tensor& t, std::vector<int64_t>* shape, std::vector<int64_t>* strides) {
  shape->clear();
  strides->clear();
  for (size_t i = 0; i < t.shape.size(); ++i)
    if (t.shape[i] != 1) {
      shape->push_back(t.shape[i]);
      strides->push_back(t.strides[i]);
    }
}

// Largest element offset reachable, +1 (0 for an empty tensor).
inline int64_t extent(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  int64_t last = 0;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 0) return 0;
    last += (shape[i] - 1) * strides[i];
  }
  return last + 1;
}

}  // namespace detail

// Copies src into dst (same logical shape up to size-1 dims). Returns false with
// a message naming `what` when shapes, dtypes, strides or sizes do not fit.
inline bool copy(const Tensor& src, const Tensor& dst_in, void* dst_data, const std::string& what,
                 std::string* err) {
  const size_t ssz = anemll_dtype_size(src.dtype), dsz = anemll_dtype_size(dst_in.dtype);
  if (!convertible(src.dtype, dst_in.dtype)) {
    *err = what + ": cannot convert " + anemll_dtype_name(src.dtype) + " into " + anemll_dtype_name(dst_in.dtype);
    return false;
  }
  if (src.shape.size() != src.strides.size() || dst_in.shape.size() != dst_in.strides.size()) {
    *err = what + ": shape and strides differ in rank";
    return false;
  }
  for (int64_t v : src.strides)
    if (v < 0) {
      *err = what + ": negative source stride";
      return false;
    }
  for (int64_t v : dst_in.strides)
    if (v < 0) {
      *err = what + ": negative destination stride";
      return false;
    }
  for (int64_t v : src.shape)
    if (v < 0) {
      *err = what + ": negative source dimension";
      return false;
    }
  std::vector<int64_t> shape, s_str, d_shape, d_str;
  detail::squeeze(src, &shape, &s_str);
  detail::squeeze(dst_in, &d_shape, &d_str);
  if (shape != d_shape) {
    *err = what + ": the model produced shape " + shape_str(src.shape) + ", the engine expects " +
           shape_str(dst_in.shape);
    return false;
  }
  const int64_t s_ext = detail::extent(shape, s_str), d_ext = detail::extent(shape, d_str);
  if (static_cast<uint64_t>(s_ext) * ssz > src.nbytes) {
    *err = what + ": source strides reach past its " + std::to_string(src.nbytes) + " bytes";
    return false;
  }
  if (static_cast<uint64_t>(d_ext) * dsz > dst_in.nbytes) {
    *err = what + ": destination strides reach past its " + std::to_string(dst_in.nbytes) + " bytes";
    return false;
  }
  if (s_ext == 0) return true;  // empty tensor
  if (shape.empty()) {          // a single element
    shape.push_back(1);
    s_str.push_back(1);
    d_str.push_back(1);
  }
  const auto* s = static_cast<const unsigned char*>(src.data);
  auto* d = static_cast<unsigned char*>(dst_data);
  const size_t rank = shape.size();
  const int64_t inner = shape[rank - 1];
  const int64_t s_in = s_str[rank - 1], d_in = d_str[rank - 1];
  const bool same = src.dtype == dst_in.dtype;
  const bool rows_contiguous = same && s_in == 1 && d_in == 1;
  std::vector<int64_t> idx(rank, 0);
  for (;;) {
    int64_t so = 0, dof = 0;
    for (size_t k = 0; k + 1 < rank; ++k) {
      so += idx[k] * s_str[k];
      dof += idx[k] * d_str[k];
    }
    if (rows_contiguous) {
      std::memcpy(d + dof * dsz, s + so * ssz, static_cast<size_t>(inner) * ssz);
    } else if (same) {
      for (int64_t j = 0; j < inner; ++j) std::memcpy(d + (dof + j * d_in) * dsz, s + (so + j * s_in) * ssz, ssz);
    } else {
      for (int64_t j = 0; j < inner; ++j)
        detail::store(d + (dof + j * d_in) * dsz, dst_in.dtype, detail::load(s + (so + j * s_in) * ssz, src.dtype));
    }
    // Next row: odometer over all but the last dimension.
    size_t k = rank - 1;
    while (k > 0) {
      --k;
      if (++idx[k] < shape[k]) break;
      idx[k] = 0;
      if (k == 0) return true;
    }
    if (rank == 1) return true;
  }
}

}  // namespace coreml_copy
}  // namespace anemll
