// Scalar bf16 / fp16 <-> fp32 conversions and row loads/stores in any of the op's dtypes.
// Everything here has internal linkage: the per-ISA kernel sources include it with their own
// compiler flags, and a shared out-of-line copy could carry instructions another CPU lacks.
#pragma once

#include <cstdint>
#include <cstring>

#include "attention.h"

namespace neo {
namespace {

inline float bits_to_f32(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t f32_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bf16_to_f32(uint16_t bits) { return bits_to_f32(static_cast<uint32_t>(bits) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float value) {
  uint32_t bits = f32_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t half) {
  uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_f32(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
  float magnitude = static_cast<float>(mantissa) * bits_to_f32(0x33800000u);
  return sign ? -magnitude : magnitude;
}

// Round to nearest even, overflow to infinity, NaN stays a NaN.
inline uint16_t f32_to_f16(float value) {
  uint32_t bits = f32_to_bits(value);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  if (magnitude < 0x38800000u) {
    // Below the smallest normal (2^-14): scale into units of 2^-24 and round to nearest even
    // (the float addition of 0.5 * 2^23 rounds exactly that way).
    float scaled = bits_to_f32(magnitude) * 16777216.0f;
    uint32_t units = f32_to_bits(scaled + 8388608.0f) - 0x4b000000u;
    return sign | static_cast<uint16_t>(units);
  }
  uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

// dst[i] = src[offset + i] as fp32.
inline void load_row_f32(DType dtype, const void* src, int64_t offset, int64_t n, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(src) + offset, n * sizeof(float));
      return;
    case DType::kFloat16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(static_cast<const uint16_t*>(src)[offset + i]);
      return;
    case DType::kBFloat16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(static_cast<const uint16_t*>(src)[offset + i]);
      return;
    case DType::kInt32:
      return;
  }
}

// dst[offset + i] = src[i] * multiplier, converted to dtype.
inline void store_row(DType dtype, void* dst, int64_t offset, const float* src, int64_t n,
                      float multiplier) {
  switch (dtype) {
    case DType::kFloat32:
      for (int64_t i = 0; i < n; ++i) static_cast<float*>(dst)[offset + i] = src[i] * multiplier;
      return;
    case DType::kFloat16:
      for (int64_t i = 0; i < n; ++i)
        static_cast<uint16_t*>(dst)[offset + i] = f32_to_f16(src[i] * multiplier);
      return;
    case DType::kBFloat16:
      for (int64_t i = 0; i < n; ++i)
        static_cast<uint16_t*>(dst)[offset + i] = f32_to_bf16(src[i] * multiplier);
      return;
    case DType::kInt32:
      return;
  }
}

}  // namespace
}  // namespace neo
