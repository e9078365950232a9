// Common prelude of every kernels/*.cu file.
//
// Under nvcc / NVRTC (__CUDACC__ defined) it pulls in the half and bfloat16 types.
// Under the host C++ compiler it pulls in the CPU execution model (cpu/cuda_cpu.h), which
// supplies the subset of CUDA C++ listed in kernels/README.md.
#pragma once
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#else
#include "cpu/cuda_cpu.h"
#endif

// Helpers shared by the kernels (device-side, both executions).
namespace etf {

// Converts a stored feature to f32 (the arithmetic type of every kernel).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Kahan-compensated running sum: deterministic, error independent of the length.
struct Kahan {
    float s, c;
    __device__ __forceinline__ Kahan() : s(0.0f), c(0.0f) {}
    __device__ __forceinline__ void add(float v) {
        float y = v - c;
        float t = s + y;
        c = (t - s) - y;
        s = t;
    }
};

// Reduction over the block (blockDim.x a multiple of 32, at most 1024) in a fixed order:
// per-warp xor-shuffle tree, then warp 0 reduces the per-warp partials. Every thread returns
// the result. `op` is associative and `id` its identity (0 for a sum, 0 for a max of
// magnitudes). `scratch` holds at least 33 T of shared memory; the call starts and ends with
// a barrier.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T id, Op op) {
    __syncthreads();
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < nwarps ? scratch[lane] : id;
        for (int o = 16; o > 0; o >>= 1) w = op(w, __shfl_xor_sync(0xffffffffu, w, o));
        if (lane == 0) scratch[32] = w;
    }
    __syncthreads();
    return scratch[32];
}

struct Add {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Sum over the block (see block_reduce).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    return block_reduce(v, scratch, T(0), Add());
}


// Sum of squares of v_i = to_f32(x[i]), i = threadIdx.x, threadIdx.x + blockDim.x, ... < len,
// over the block, as `ss` and a scale `m` with ||v|| = m sqrt(ss): m = 1 (the plain sum) unless
// that sum overflows or underflows f32, when it is redone on v / max|v|. So a finite vector never
// gets an infinite or a zero norm unless it is zero (docs/head.md#feature-normalisation). The
// branch is taken by the whole block (it tests the reduced value), so its barriers are safe.
struct ScaledSumSq {
    float ss, m;
};
template <typename F>
__device__ __forceinline__ ScaledSumSq block_sumsq_scaled(const F* x, long long len, float* scratch) {
    Kahan acc;
    for (long long i = threadIdx.x; i < len; i += blockDim.x) {
        float v = to_f32(x[i]);
        acc.add(v * v);
    }
    ScaledSumSq r{block_sum(acc.s, scratch), 1.0f};
    if (!(r.ss <= 3.402823466e38f) || r.ss < 1.175494351e-38f) {
        float mx = 0.0f;
        for (long long i = threadIdx.x; i < len; i += blockDim.x) mx = fmaxf(mx, fabsf(to_f32(x[i])));
        mx = block_reduce(mx, scratch, 0.0f, Max());
        if (mx > 0.0f && mx <= 3.402823466e38f) {
            Kahan a2;
            for (long long i = threadIdx.x; i < len; i += blockDim.x) {
                float v = to_f32(x[i]) / mx;
                a2.add(v * v);
            }
            r.ss = block_sum(a2.s, scratch);
            r.m = mx;
        }
    }
    return r;
}

}  // namespace etf

namespace etf {
// The moving-mean plan of one class (the rules in moving.cu): its source (0 centred mean,
// 1 weighted global mean, 2 global mean, 3 held) and its seen flag after the step, from
// whether it has rows in the batch (over every rank in a data-parallel step), the
// absent-class policy (0 Hold, 1 Reference), whether this is the first step, its seen flag
// and whether any class is absent. Used by step_begin_* (stats.cu) and stats_unpack_f32
// (collective.cu).
__device__ __forceinline__ void moving_plan(bool present, int policy, bool first, int seen, int any_absent, int* source, int* seen_new) {
    int s;
    if (present) s = 0;
    else if (policy == 0) s = 3;
    else if (first) s = 1;
    else if (!seen) s = 2;
    else s = 3;
    *source = s;
    *seen_new = ((policy == 0 || any_absent) && present) ? 1 : seen;
}

// The forward entries of the step status word (kernels/head/status.cu) record no error.
__device__ __forceinline__ bool forward_ok(const int* status) {
    return status[0] == 2147483647 && status[1] == 2147483647 && status[2] == 0 && status[3] == 0;
}
}  // namespace etf

namespace etf {
// Deterministic grid-wide sum in one launch: every block passes its block-reduced partial
// (valid in thread 0). Thread 0 stores it in partials[blockIdx.x] and takes a ticket; the last
// block to arrive sums the partials in block order (the same order on every run, whatever the
// blocks' timing), writes *result, resets *ticket to 0 for the next launch, and returns true
// in all its threads; every other block returns false. ticket: an int that is 0 between
// launches (zero-filled once when allocated). partials: gridDim.x doubles.
__device__ __forceinline__ bool grid_sum_last(double part, double* partials, int* ticket, double* result) {
    __shared__ int s_last;
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = part;
        __threadfence();
        const int t = atomicAdd(ticket, 1);
        s_last = t == (int)(gridDim.x * gridDim.y * gridDim.z) - 1;
    }
    __syncthreads();
    if (!s_last) return false;
    if (threadIdx.x == 0) {
        __threadfence();
        double s = 0.0;
        const volatile double* p = partials;
        for (int b = 0; b < (int)(gridDim.x * gridDim.y * gridDim.z); b++) s += p[b];
        *result = s;
        *ticket = 0;
    }
    __syncthreads();
    return true;
}
}  // namespace etf

namespace etf {
// Sum over the 32 lanes of a warp (fixed butterfly order: the same result every run); every
// lane gets it. All 32 lanes must call it.
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// The row-group loop of the row kernels: rows are taken by groups of `lanes` threads (32 on a
// GPU: a warp per row, its lanes striding over the row's elements, so the loads and stores of
// a row-major matrix are coalesced; 1 on the CPU execution, where a shuffle is a
// synchronisation of host threads and a thread per row is faster). blockDim.x a multiple of
// `lanes`; `lanes` is 1 or 32.
struct RowGroups {
    int first, stride, lane, lanes;
    __device__ __forceinline__ explicit RowGroups(int g)
        : first((int)((blockIdx.x * blockDim.x + threadIdx.x) / g)),
          stride((int)((gridDim.x * blockDim.x) / g)),
          lane((int)(threadIdx.x % g)),
          lanes(g) {}
    // The sum of v over the group (fixed order; every lane of the group gets it).
    __device__ __forceinline__ double sum(double v) const { return lanes == 1 ? v : warp_sum(v); }
};
}  // namespace etf
