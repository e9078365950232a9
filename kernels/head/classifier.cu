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

// One row group per feature j (etf::RowGroups: a warp on a GPU): w[c][j] = a (p[j][c] - mean_c p[j][.]) (P's rows
// read coalesced; W is K x d, so its writes stride by d).
extern "C" __global__ void weights_from_p_f64(const double* p, int d, int k, double a, float* w, int lanes) {
    const etf::RowGroups wr(lanes);
    for (int j = wr.first; j < d; j += wr.stride) {
        const double* pr = p + (size_t)j * k;
        double m = 0.0;
        for (int c = wr.lane; c < k; c += wr.lanes) m += pr[c];
        m = wr.sum(m) / k;
        for (int c = wr.lane; c < k; c += wr.lanes) w[(size_t)c * d + j] = (float)(a * (pr[c] - m));
    }
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

// One block per class c (blockDim a multiple of 32): b[c] = -sum_j w[c][j] mu[j] (fixed-order
// block sum), and column c of the n x k logits pre-filled with b[c], so that the logits
// product adds X W^T onto it (beta = 1): bias_from_w_f32 and add_bias_rows_f32 in one launch.
extern "C" __global__ void bias_prefill_f32(const float* w, const float* mu, int k, int d, int n, float* b, float* z) {
    __shared__ float scratch[33];
    const int c = blockIdx.x;
    etf::Kahan acc;
    for (int j = threadIdx.x; j < d; j += blockDim.x) acc.add(w[(size_t)c * d + j] * mu[j]);
    const float bc = -etf::block_sum(acc.s, scratch);
    if (threadIdx.x == 0) b[c] = bc;
    for (int i = threadIdx.x; i < n; i += blockDim.x) z[(size_t)i * k + c] = bc;
}

// One thread per column c of dZ = dL/dlogits (n x k, grid-stride): s[c] = scale sum_i z[i][c]
// (col_sums_f32), and a non-finite entry's flat index into status[entry] (atomicMin: the
// first), as check_finite_f32 does.
extern "C" __global__ void dlogits_prep_f32(const float* z, int n, int k, float scale, float* s, int* status, int entry) {
    const int stride = gridDim.x * blockDim.x;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < k; c += stride) {
        etf::Kahan acc;
        int bad = -1;
        for (int i = 0; i < n; i++) {
            const float v = z[(size_t)i * k + c];
            if (!(fabsf(v) <= 1e30f) && bad < 0) bad = i * k + c;
            acc.add(v);
        }
        s[c] = scale * acc.s;
        if (bad >= 0) atomicMin(status + entry, bad);
    }
}

// weights_backward_f32 and dmu_bias_f32 in one pass, one thread per feature j:
// v[j][c] = a (dW[c][j] - mean_c dW[.][j]) with dW = dwt - db mu^T (f64, d x K), and
// dmu[j] = -sum_c w[c][j] db[c].
extern "C" __global__ void weights_backward_dmu_f32(const float* dwt, const float* db, const float* mu, const float* w, int k, int d, double a, double* v, float* dmu) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        double m = 0.0;
        etf::Kahan acc;
        for (int c = 0; c < k; c++) {
            m += (double)dwt[(size_t)c * d + j] - (double)db[c] * (double)mu[j];
            acc.add(w[(size_t)c * d + j] * db[c]);
        }
        m /= k;
        for (int c = 0; c < k; c++) {
            double g = (double)dwt[(size_t)c * d + j] - (double)db[c] * (double)mu[j];
            v[(size_t)j * k + c] = a * (g - m);
        }
        dmu[j] = -acc.s;
    }
}
