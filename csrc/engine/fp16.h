// IEEE half <-> float without hardware support, plus an order-preserving
// int16 key so that argmax/top-k run on raw fp16 bits (vectorizable, no convert).
#pragma once

#include <cstdint>
#include <cstring>

namespace anemll {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) return sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u);
  if (absx >= 0x477FF000u) return sign | 0x7C00u;  // overflow to inf
  if (absx < 0x38800000u) {                          // subnormal or zero
    if (absx < 0x33000000u) return sign;
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent
  const uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

// Monotonic in the half's value for non-NaN inputs: larger value, larger key.
inline int16_t half_key(uint16_t h) {
  const int16_t s = static_cast<int16_t>(h);
  return static_cast<int16_t>(s ^ ((s >> 15) & 0x7FFF));
}

constexpr uint16_t kHalfNegInf = 0xFC00u;
constexpr int16_t kKeyNegInf = static_cast<int16_t>(0x8000 | 0x03FF);  // half_key(0xFC00)

// Table-driven conversion for bulk use (256 KiB, built once).
const float* half_table();

}  // namespace anemll
