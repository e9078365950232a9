// Normalisations: feature rows to norm tau (docs/head.md#feature-normalisation), with the
// finiteness check of the features, and the backward's per-row gradient through every path;
// the Frobenius normalisation Y = E / ||E|| of the first step (later steps fuse it into
// solve.cu's build_g; its norm comes from moving.cu). Deterministic reductions.
#include "etf_cuda.h"

// y = e / norm[0], elementwise.
extern "C" __global__ void frobenius_scale_f32(const float* e, const float* norm, int len, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) y[i] = e[i] / norm[0];
}

// ---- the forward's feature rows and the backward's per-row gradient (one block per row) ---

// One block per row i (blockDim.x a multiple of 32): x_i = s_i r_i in f32, with
//   tau > 0: s_i = tau / max(||r_i||, 1e-12) (the feature normalisation), stored as
//            scale[i] = s_i, or -s_i when the 1e-12 floor applied (the backward needs it);
//   tau = 0: s_i = 1 (a conversion to f32; scale not written).
// A non-finite element (or |v| > 1e30, MAX_MAGNITUDE of src/core/validate.rs) records its
// flat index in status[1] (atomicMin: the first one), the first in row-major order.
template <typename F>
__device__ __forceinline__ void prepare_rows(const F* raw, int d, float tau, float* x, float* scale, int* status) {
    __shared__ float scratch[33];
    __shared__ int s_bad;
    const size_t row = (size_t)blockIdx.x * d;
    const F* r = raw + row;
    if (threadIdx.x == 0) s_bad = 2147483647;
    __syncthreads();
    int bad = 2147483647;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = etf::to_f32(r[j]);
        if (!(fabsf(v) <= 1e30f) && bad == 2147483647) bad = j;
    }
    if (bad != 2147483647) atomicMin(&s_bad, bad);
    float s = 1.0f;
    if (tau > 0.0f) {
        const etf::ScaledSumSq q = etf::block_sumsq_scaled(r, d, scratch);
        const float nrm = q.m * sqrtf(q.ss);
        s = tau / fmaxf(nrm, 1e-12f);
        if (threadIdx.x == 0) scale[blockIdx.x] = nrm > 1e-12f ? s : -s;
    } else {
        __syncthreads();
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) x[row + j] = s * etf::to_f32(r[j]);
    if (threadIdx.x == 0 && s_bad != 2147483647) atomicMin(status + 1, (int)(row + s_bad));
}
extern "C" __global__ void prepare_rows_f32(const float* raw, int d, float tau, float* x, float* scale, int* status) { prepare_rows(raw, d, tau, x, scale, status); }
extern "C" __global__ void prepare_rows_f16(const __half* raw, int d, float tau, float* x, float* scale, int* status) { prepare_rows(raw, d, tau, x, scale, status); }
extern "C" __global__ void prepare_rows_bf16(const __nv_bfloat16* raw, int d, float tau, float* x, float* scale, int* status) { prepare_rows(raw, d, tau, x, scale, status); }

// One block per row i: the gradient on the raw features, every path summed in one pass:
//   g_ij = dx[i][j] + dct[y_i][j] / n_{y_i} + gm[j]
// (the classifier's direct gradient, the class-mean term, and the global-mean term
// gm = (d_mu - sum_{c present} d_centred[:, c]) / N from moving_backward_f32), then the
// feature normalisation's backward with the forward's x and scale (tau > 0):
//   dr = s (g - x (x . g) / tau^2)    (x / tau is the unit row r / ||r||)
//   dr = s g                          (the 1e-12 floor applied: scale < 0)
// or dr = g (tau = 0). dct: K x d (the class-mean gradient, transposed for coalesced rows).
extern "C" __global__ void rows_backward_f32(const float* dx, const float* dct, const float* gm, const int* labels, const int* counts, const float* x, const float* scale, int d, float tau, float* dr) {
    __shared__ float scratch[33];
    const size_t row = (size_t)blockIdx.x * d;
    const int y = labels[blockIdx.x];
    const float inv = 1.0f / (float)counts[y];
    const float* dc = dct + (size_t)y * d;
    if (tau > 0.0f) {
        etf::Kahan dot;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = dx[row + j] + dc[j] * inv + gm[j];
            dot.add(x[row + j] * g);
        }
        const float xg = etf::block_sum(dot.s, scratch);
        const float sc = scale[blockIdx.x];
        const float s = fabsf(sc), p = sc > 0.0f ? xg / (tau * tau) : 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = dx[row + j] + dc[j] * inv + gm[j];
            dr[row + j] = s * (g - x[row + j] * p);
        }
    } else {
        for (int j = threadIdx.x; j < d; j += blockDim.x) dr[row + j] = dx[row + j] + dc[j] * inv + gm[j];
    }
}
