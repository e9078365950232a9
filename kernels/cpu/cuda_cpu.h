// CPU execution model of CUDA C++ for the kernels of implicit-etf.
//
// The threads of a block run concurrently as real host threads (a persistent pool), so
// __syncthreads, __syncwarp, shuffles and votes have their true semantics; blocks run one
// after another; launches are serialised process-wide (cpu/runtime.cpp). The supported
// subset is listed in kernels/README.md. Misuse that a GPU would reject or hang on
// (barrier with exited threads, divergent barriers, shuffles with absent lanes) aborts the
// launch with an error message instead of hanging.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

using std::isfinite;
using std::isnan;

// ---- qualifiers -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__ static const
// Static shared memory: a function-local `static` has one instance per process; blocks run
// one after another and launches are serialised, so it is exactly "one per block".
// (`extern __shared__ T name[];` is rewritten by build.rs into a pointer to the per-launch
// dynamic shared memory.)
#define __shared__ static

// ---- built-in vector types and indices ---------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
// The indices live in the runtime's namespace (C++-mangled and, with the library's hidden
// visibility, local to the binary that links it), and are brought into the kernels' scope.
namespace etf_cpu {
extern thread_local uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
}  // namespace etf_cpu
using etf_cpu::blockDim;
using etf_cpu::blockIdx;
using etf_cpu::gridDim;
using etf_cpu::threadIdx;
static const int warpSize = 32;

namespace etf_cpu {
// Implemented in cpu/runtime.cpp.
void syncthreads(const char* site);
int syncthreads_count(int pred, const char* site);
void syncwarp(unsigned mask, const char* site);
unsigned long long warp_exchange(unsigned mask, unsigned long long mine, int src_lane, const char* site);
unsigned warp_ballot(unsigned mask, int pred, const char* site);
void* dynamic_shared();
[[noreturn]] void trap(const char* what);

template <typename T>
inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
inline int lane_id() {
    unsigned lin = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return (int)(lin & 31u);
}
}  // namespace etf_cpu

#define ETF_CPU_STR2(x) #x
#define ETF_CPU_STR(x) ETF_CPU_STR2(x)
#define ETF_CPU_SITE __FILE__ ":" ETF_CPU_STR(__LINE__)

// ---- barriers and warp operations --------------------------------------------------------
#define __syncthreads() ::etf_cpu::syncthreads(ETF_CPU_SITE)
#define __syncthreads_count(p) ::etf_cpu::syncthreads_count((p) ? 1 : 0, ETF_CPU_SITE)
#define __syncthreads_or(p) (::etf_cpu::syncthreads_count((p) ? 1 : 0, ETF_CPU_SITE) != 0)
#define __syncthreads_and(p) (::etf_cpu::syncthreads_count((p) ? 0 : 1, ETF_CPU_SITE) == 0)
#define __syncwarp(...) ::etf_cpu::syncwarp(ETF_CPU_MASK_OR_FULL(__VA_ARGS__), ETF_CPU_SITE)
#define ETF_CPU_MASK_OR_FULL(...) (0xffffffffu __VA_OPT__(& (__VA_ARGS__)))
#define __shfl_sync(mask, v, src, ...) ::etf_cpu::shfl_idx((mask), (v), (src), ETF_CPU_WIDTH(__VA_ARGS__), ETF_CPU_SITE)
#define __shfl_xor_sync(mask, v, m, ...) ::etf_cpu::shfl_xor((mask), (v), (m), ETF_CPU_WIDTH(__VA_ARGS__), ETF_CPU_SITE)
#define __shfl_down_sync(mask, v, d, ...) ::etf_cpu::shfl_down((mask), (v), (d), ETF_CPU_WIDTH(__VA_ARGS__), ETF_CPU_SITE)
#define __shfl_up_sync(mask, v, d, ...) ::etf_cpu::shfl_up((mask), (v), (d), ETF_CPU_WIDTH(__VA_ARGS__), ETF_CPU_SITE)
#define ETF_CPU_WIDTH(...) (32 __VA_OPT__(* 0 + (__VA_ARGS__)))
#define __ballot_sync(mask, p) ::etf_cpu::warp_ballot((mask), (p) ? 1 : 0, ETF_CPU_SITE)
#define __any_sync(mask, p) (::etf_cpu::warp_ballot((mask), (p) ? 1 : 0, ETF_CPU_SITE) != 0u)
#define __all_sync(mask, p) (::etf_cpu::warp_ballot((mask), (p) ? 0 : 1, ETF_CPU_SITE) == 0u)
#define __trap() ::etf_cpu::trap("__trap()")

namespace etf_cpu {
template <typename T>
inline T shfl_idx(unsigned mask, T v, int src, int width, const char* site) {
    int lane = lane_id();
    int base = lane & ~(width - 1);
    int s = base + (src & (width - 1));
    return from_bits<T>(warp_exchange(mask, to_bits(v), s, site));
}
template <typename T>
inline T shfl_xor(unsigned mask, T v, int m, int width, const char* site) {
    int lane = lane_id();
    int s = lane ^ m;
    if ((s & ~(width - 1)) != (lane & ~(width - 1))) s = lane;
    return from_bits<T>(warp_exchange(mask, to_bits(v), s, site));
}
template <typename T>
inline T shfl_down(unsigned mask, T v, unsigned d, int width, const char* site) {
    int lane = lane_id();
    int s = lane + (int)d;
    if ((s & ~(width - 1)) != (lane & ~(width - 1))) s = lane;
    return from_bits<T>(warp_exchange(mask, to_bits(v), s, site));
}
template <typename T>
inline T shfl_up(unsigned mask, T v, unsigned d, int width, const char* site) {
    int lane = lane_id();
    int s = lane - (int)d;
    if (s < (lane & ~(width - 1))) s = lane;
    return from_bits<T>(warp_exchange(mask, to_bits(v), s, site));
}
}  // namespace etf_cpu

// ---- atomics (device-scope, relaxed like the GPU's) ----------------------------------------
#define ETF_CPU_ATOMIC_INT(T)                                                                    \
    inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }       \
    inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }       \
    inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }       \
    inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }         \
    inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }       \
    inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }     \
    inline T atomicCAS(T* a, T cmp, T v) {                                                     \
        __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
        return cmp;                                                                            \
    }                                                                                          \
    inline T atomicMax(T* a, T v) {                                                            \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                          \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST,     \
                                                        __ATOMIC_SEQ_CST)) {}                  \
        return old;                                                                            \
    }                                                                                          \
    inline T atomicMin(T* a, T v) {                                                            \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                          \
        while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST,     \
                                                        __ATOMIC_SEQ_CST)) {}                  \
        return old;                                                                            \
    }
ETF_CPU_ATOMIC_INT(int)
ETF_CPU_ATOMIC_INT(unsigned int)
ETF_CPU_ATOMIC_INT(unsigned long long)
#undef ETF_CPU_ATOMIC_INT

#define ETF_CPU_ATOMIC_FLOAT(T, U)                                                               \
    inline T atomicAdd(T* a, T v) {                                                            \
        U* p = reinterpret_cast<U*>(a);                                                        \
        U old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                          \
        for (;;) {                                                                             \
            T f;                                                                               \
            std::memcpy(&f, &old, sizeof f);                                                   \
            T n = f + v;                                                                       \
            U nb;                                                                              \
            std::memcpy(&nb, &n, sizeof nb);                                                   \
            if (__atomic_compare_exchange_n(p, &old, nb, true, __ATOMIC_SEQ_CST,               \
                                            __ATOMIC_SEQ_CST))                                 \
                return f;                                                                      \
        }                                                                                      \
    }                                                                                          \
    inline T atomicExch(T* a, T v) {                                                           \
        U nb;                                                                                  \
        std::memcpy(&nb, &v, sizeof nb);                                                       \
        U ob = __atomic_exchange_n(reinterpret_cast<U*>(a), nb, __ATOMIC_SEQ_CST);             \
        T o;                                                                                   \
        std::memcpy(&o, &ob, sizeof o);                                                        \
        return o;                                                                              \
    }
ETF_CPU_ATOMIC_FLOAT(float, unsigned int)
ETF_CPU_ATOMIC_FLOAT(double, unsigned long long)
#undef ETF_CPU_ATOMIC_FLOAT

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- math ------------------------------------------------------------------------------------
// <cmath> supplies sqrtf, expf, logf, fabsf, fmaxf, fminf, fmaf, floorf, ceilf, powf, tanhf and
// their double versions. CUDA-only ones:
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- __half and __nv_bfloat16 (storage types; conversions round to nearest even) -----------
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
inline float __half2float(__half h) {
    unsigned s = (h.x >> 15) & 1u, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 0x400u), (int)e - 25);
    return s ? -v : v;
}
inline __half __float2half(float f) {
    unsigned b;
    std::memcpy(&b, &f, 4);
    unsigned s = (b >> 16) & 0x8000u;
    float a = std::fabs(f);
    __half h;
    if (std::isnan(f)) { h.x = (unsigned short)(s | 0x7e00u); return h; }
    if (a >= 65520.0f) { h.x = (unsigned short)(s | 0x7c00u); return h; }
    if (a < 6.103515625e-05f) {  // subnormal half: multiple of 2^-24, rint = nearest even
        h.x = (unsigned short)(s | (unsigned)std::nearbyint(std::ldexp(a, 24)));
        return h;
    }
    int e;
    float fr = std::frexp(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
    unsigned m = (unsigned)std::nearbyint(std::ldexp(fr, 11));  // 1024..2048
    if (m == 2048u) { m = 1024u; e += 1; }
    unsigned he = (unsigned)(e + 14);
    if (he >= 31u) { h.x = (unsigned short)(s | 0x7c00u); return h; }
    h.x = (unsigned short)(s | (he << 10) | (m & 0x3ffu));
    return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
    unsigned b = (unsigned)h.x << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned b;
    std::memcpy(&b, &f, 4);
    __nv_bfloat16 h;
    if (std::isnan(f)) { h.x = (unsigned short)((b >> 16) | 0x40u); return h; }
    b += 0x7fffu + ((b >> 16) & 1u);
    h.x = (unsigned short)(b >> 16);
    return h;
}
