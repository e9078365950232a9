// Normalisations: feature rows to norm tau (docs/head.md#feature-normalisation) and the Frobenius
// normalisation Y = E / ||E|| (step 4), with their backward. Deterministic reductions.
#include "etf_cuda.h"

// One block per row (blockDim.x a multiple of 32); x = tau * r / max(||r||, 1e-12), x in f32.
template <typename F>
__device__ __forceinline__ void tau_normalise(const F* raw, int d, float tau, float* x) {
    __shared__ float scratch[33];
    const F* r = raw + (size_t)blockIdx.x * d;
    etf::ScaledSumSq q = etf::block_sumsq_scaled(r, d, scratch);
    float nrm = q.m * sqrtf(q.ss);
    float s = tau / fmaxf(nrm, 1e-12f);
    for (int j = threadIdx.x; j < d; j += blockDim.x) x[(size_t)blockIdx.x * d + j] = s * etf::to_f32(r[j]);
}
extern "C" __global__ void tau_normalise_f32(const float* raw, int d, float tau, float* x) { tau_normalise(raw, d, tau, x); }
extern "C" __global__ void tau_normalise_f16(const __half* raw, int d, float tau, float* x) { tau_normalise(raw, d, tau, x); }
extern "C" __global__ void tau_normalise_bf16(const __nv_bfloat16* raw, int d, float tau, float* x) { tau_normalise(raw, d, tau, x); }

// dr = tau / ||r|| * (dx - r (r . dx) / ||r||^2) if ||r|| > 1e-12, else tau / 1e-12 * dx.
// With r = m r' (m = 1 unless the plain sum of squares over- or underflows):
// r (r . dx) / ||r||^2 = r' (r' . dx) / ||r'||^2.
template <typename F>
__device__ __forceinline__ void tau_normalise_backward(const F* raw, const float* dx, int d, float tau, float* dr) {
    __shared__ float scratch[33];
    size_t row = (size_t)blockIdx.x * d;
    etf::ScaledSumSq q = etf::block_sumsq_scaled(raw + row, d, scratch);
    etf::Kahan dot;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dot.add(etf::to_f32(raw[row + j]) / q.m * dx[row + j]);
    float rd = etf::block_sum(dot.s, scratch);
    float nrm = q.m * sqrtf(q.ss);
    if (nrm > 1e-12f) {
        float s = tau / nrm, p = rd / q.ss;
        for (int j = threadIdx.x; j < d; j += blockDim.x)
            dr[row + j] = s * (dx[row + j] - etf::to_f32(raw[row + j]) / q.m * p);
    } else {
        for (int j = threadIdx.x; j < d; j += blockDim.x) dr[row + j] = tau / 1e-12f * dx[row + j];
    }
}
extern "C" __global__ void tau_normalise_backward_f32(const float* raw, const float* dx, int d, float tau, float* dr) { tau_normalise_backward(raw, dx, d, tau, dr); }
extern "C" __global__ void tau_normalise_backward_f16(const __half* raw, const float* dx, int d, float tau, float* dr) { tau_normalise_backward(raw, dx, d, tau, dr); }
extern "C" __global__ void tau_normalise_backward_bf16(const __nv_bfloat16* raw, const float* dx, int d, float tau, float* dr) { tau_normalise_backward(raw, dx, d, tau, dr); }

// out[0] = ||a||, overflow-free (see etf::block_sumsq_scaled). One block, blockDim.x a multiple
// of 32.
extern "C" __global__ void norm_single_block_f32(const float* a, int len, float* out) {
    __shared__ float scratch[33];
    etf::ScaledSumSq q = etf::block_sumsq_scaled(a, len, scratch);
    if (threadIdx.x == 0) out[0] = q.m * sqrtf(q.ss);
}

// out[0] = sum_i a_i b_i. One block, blockDim.x a multiple of 32.
extern "C" __global__ void dot_single_block_f32(const float* a, const float* b, int len, float* out) {
    __shared__ float scratch[33];
    etf::Kahan acc;
    for (int i = threadIdx.x; i < len; i += blockDim.x) acc.add(a[i] * b[i]);
    float s = etf::block_sum(acc.s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}

// y = e / norm[0], elementwise.
extern "C" __global__ void frobenius_scale_f32(const float* e, const float* norm, int len, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) y[i] = e[i] / norm[0];
}

// de = (dy - y * dot[0]) / norm[0], with dot[0] = <y, dy>.
extern "C" __global__ void frobenius_normalise_backward_f32(const float* y, const float* dy, const float* norm, const float* dot, int len, float* de) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) de[i] = (dy[i] - y[i] * dot[0]) / norm[0];
}
