// Counter-based randomness shared by the CPU and CUDA kernels: every random decision is a pure
// function of (key, counter), so nothing is stored, any element can be computed independently of
// the others (one GPU thread each) and a result depends only on the seed, never on the thread
// count or the device.
#pragma once

#include "capability_namespace.h"

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LTFAST_RANDOM_HD __host__ __device__ __forceinline__
#else
#define LTFAST_RANDOM_HD inline
#endif

namespace ltfast {
namespace math {
LTFAST_CAPABILITY_NAMESPACE_BEGIN

// A keyed, counter-based 32-bit hash (Wellons' "lowbias32" finaliser: 2 multiplies, 3 xor-shifts,
// bias ~0.17 in his avalanche test).
LTFAST_RANDOM_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Folds a 64-bit counter into a 32-bit key: both halves go through the hash, so counters that
// differ only above bit 31 (late epochs of a long run) still give unrelated keys.
LTFAST_RANDOM_HD uint32_t mix_key(uint32_t key, uint64_t value) {
  return hash32(hash32(key ^ static_cast<uint32_t>(value)) ^ static_cast<uint32_t>(value >> 32));
}

LTFAST_RANDOM_HD uint32_t seed_key(uint64_t seed, uint32_t stream_tag) {
  return mix_key(hash32(stream_tag), seed);
}

// A uniform double in [0, 1) with 53 random bits from two hashes of (key, counter).
LTFAST_RANDOM_HD double uniform01(uint32_t key, uint64_t counter) {
  const uint32_t first = mix_key(key, counter);
  const uint32_t second = hash32(first ^ 0x68e31da4U);
  const uint64_t bits = (static_cast<uint64_t>(first) << 21) ^ static_cast<uint64_t>(second >> 11);
  return static_cast<double>(bits & ((uint64_t(1) << 53) - 1)) * (1.0 / 9007199254740992.0);
}

// A keyed pseudo-random permutation of [0, n), evaluated at one point: a 4-round balanced Feistel
// network on the smallest even number of bits that covers n (so the domain is < 4n), with cycle
// walking back into [0, n). Because it is a bijection, shuffling n items needs no array and no
// sort: item `position` of the shuffled order is permute(position). Expected walk length < 4.
LTFAST_RANDOM_HD uint64_t permute(uint64_t position, uint64_t n, uint32_t key) {
  if (n <= 1) return 0;
  int bits = 0;
  while (bits < 64 && (uint64_t(1) << bits) < n) ++bits;
  if (bits < 2) bits = 2;
  if (bits & 1) ++bits;
  const int half = bits / 2;
  const uint64_t mask = (half >= 64) ? ~uint64_t(0) : ((uint64_t(1) << half) - 1);
  uint32_t round_keys[4];
  for (uint32_t r = 0; r < 4; ++r) round_keys[r] = hash32(key + 0x9e3779b9U * (r + 1));
  uint64_t x = position;
  do {
    uint64_t left = x >> half, right = x & mask;
    for (int r = 0; r < 4; ++r) {
      const uint64_t f = static_cast<uint64_t>(hash32(static_cast<uint32_t>(right) ^ round_keys[r])) & mask;
      const uint64_t next_right = left ^ f;
      left = right;
      right = next_right;
    }
    x = (left << half) | right;
  } while (x >= n);
  return x;
}

LTFAST_CAPABILITY_NAMESPACE_END
}  // namespace math
}  // namespace ltfast
