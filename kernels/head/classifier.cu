// The classifier of the implicit-ETF head (docs/head.md#the-classifier-and-logits) and its backward:
//   W = sqrt(K/(K-1)) (P M)^T  (K x d, f32)      weights_from_p
//   b = -W mu                                    bias_from_w
//   logits = X W^T + b                           gemm_f32 + add_bias_rows
// Backward from dZ = dL/dlogits (N x K):
//   db = 1^T dZ                                  col_sums_f32
//   dW = dZ^T X - db mu^T,  V = dL/dP = a (dW^T) M (f64)    gemm_f32 + weights_backward
//   dX (direct) = dZ W                           gemm_f32
//   dmu (bias path) = -W^T db                    dmu_bias
// Grid-stride loops: any launch shape. Long sums are Kahan-compensated in fixed order.
#include "etf_cuda.h"

// One thread per feature j: w[c][j] = a (p[j][c] - mean_c p[j][.]).
extern "C" __global__ void weights_from_p_f64(const double* p, int d, int k, double a, float* w) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        const double* pr = p + (size_t)j * k;
        double m = 0.0;
        for (int c = 0; c < k; c++) m += pr[c];
        m /= k;
        for (int c = 0; c < k; c++) w[(size_t)c * d + j] = (float)(a * (pr[c] - m));
    }
}

// One thread per class c: b[c] = -sum_j w[c][j] mu[j].
extern "C" __global__ void bias_from_w_f32(const float* w, const float* mu, int k, int d, float* b) {
    const int stride = gridDim.x * blockDim.x;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < k; c += stride) {
        etf::Kahan acc;
        for (int j = 0; j < d; j++) acc.add(w[(size_t)c * d + j] * mu[j]);
        b[c] = -acc.s;
    }
}

// z[i][c] += b[c] for an n x k matrix.
extern "C" __global__ void add_bias_rows_f32(float* z, const float* b, int n, int k) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)n * k; e += stride)
        z[e] += b[e % k];
}

// One thread per column c: s[c] = scale * sum_i z[i][c].
extern "C" __global__ void col_sums_f32(const float* z, int n, int k, float scale, float* s) {
    const int stride = gridDim.x * blockDim.x;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < k; c += stride) {
        etf::Kahan acc;
        for (int i = 0; i < n; i++) acc.add(z[(size_t)i * k + c]);
        s[c] = scale * acc.s;
    }
}

// One thread per feature j: dW[c][j] = dwt[c][j] - db[c] mu[j];
// v[j][c] = a (dW[c][j] - mean_c dW[.][j])  (f64, d x K).
extern "C" __global__ void weights_backward_f32(const float* dwt, const float* db, const float* mu, int k, int d, double a, double* v) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        double m = 0.0;
        for (int c = 0; c < k; c++) m += (double)dwt[(size_t)c * d + j] - (double)db[c] * (double)mu[j];
        m /= k;
        for (int c = 0; c < k; c++) {
            double g = (double)dwt[(size_t)c * d + j] - (double)db[c] * (double)mu[j];
            v[(size_t)j * k + c] = a * (g - m);
        }
    }
}

// One thread per feature j: dmu[j] = -sum_c w[c][j] db[c].
extern "C" __global__ void dmu_bias_f32(const float* w, const float* db, int k, int d, float* dmu) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        etf::Kahan acc;
        for (int c = 0; c < k; c++) acc.add(w[(size_t)c * d + j] * db[c]);
        dmu[j] = -acc.s;
    }
}

// x[i] = float(raw[i]): f16/bf16 features widened for the f32 products.
extern "C" __global__ void widen_f16(const __half* raw, long long len, float* x) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += stride) x[e] = __half2float(raw[e]);
}
extern "C" __global__ void widen_bf16(const __nv_bfloat16* raw, long long len, float* x) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += stride) x[e] = __bfloat162float(raw[e]);
}
