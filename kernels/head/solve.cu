// The nearest simplex ETF on the device (docs/solve.md), around the products of gemm.cu and
// the eigensolver of jacobi.cu:
//   Y = E / ||E||, G = c Y M + delta Prox   build_g (M = I - 11^T/K: row-mean removal, fused)
//   G^T G = Q diag(s^2) Q^T          gemm + jacobi_factor_f64 (or refine.cu's iterations first)
//   U = G (Q diag(1/s)), P = U Q^T   gemm + gemm
// All float64. Grid-stride loops: any launch shape.
#include "etf_cuda.h"

// One row group per row j (etf::RowGroups: a warp on a GPU): the Frobenius normalisation Y = E_new / ||E_new|| (f32,
// written for the backward and the report) and g[j][c] = cc * (y[j][c] - mean_c y[j][.]) +
// delta * prox[j][c] (f64); the row mean by a fixed-order warp sum.
extern "C" __global__ void build_g_f64(const float* e, const float* norm, const double* prox, int d, int k, double cc, double delta, float* y, double* g, int lanes) {
    const float nv = norm[0];
    const etf::RowGroups w(lanes);
    for (int j = w.first; j < d; j += w.stride) {
        const float* er = e + (size_t)j * k;
        float* yr = y + (size_t)j * k;
        double m = 0.0;
        for (int c = w.lane; c < k; c += w.lanes) {
            const float v = er[c] / nv;
            yr[c] = v;
            m += (double)v;
        }
        m = w.sum(m) / k;
        for (int c = w.lane; c < k; c += w.lanes) {
            size_t o = (size_t)j * k + c;
            g[o] = cc * ((double)yr[c] - m) + delta * prox[o];
        }
    }
}

// x[i][c] *= s[c] for a rows x k matrix.
extern "C" __global__ void scale_cols_f64(double* x, const double* s, int rows, int k) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)rows * k; e += stride)
        x[e] *= s[e % k];
}

// dst <- src (len doubles) when the step's forward recorded no error (state commit).
extern "C" __global__ void commit_f64(double* dst, const double* src, long long len, const int* status) {
    if (!etf::forward_ok(status)) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += stride) dst[e] = src[e];
}

// ---- Riemannian Newton polish (src/gpu/solve.rs::newton_polish) -------------------------

// Newton–Schulz factor: m = (3 I - ztz) / 2 (k x k).
extern "C" __global__ void newton_schulz_factor_f64(const double* ztz, int k, double* m) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)k * k; e += stride)
        m[e] = 0.5 * ((e / k == e % k ? 3.0 : 0.0) - ztz[e]);
}

// b = (a + a^T) / 2 (k x k).
extern "C" __global__ void symmetrise_f64(const double* a, int k, double* b) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)k * k; e += stride) {
        long long i = e / k, j = e % k;
        b[e] = 0.5 * (a[e] + a[j * k + i]);
    }
}

// Stopping rule of the Newton polish (the CPU head's, src/cpu/solve.rs::polish), one block of
// a multiple of 32 threads, run before each step with V = P B - G (the Riemannian gradient,
// B = Q diag(s) Q^T the factored sym(P^T G)) and ptp = P^T P:
//   grad = ||V||_F, orth = max |P^T P - I|;
//   done when grad <= grad_rel ||G||_F and orth <= orth_tol (rounding level), or, from the
//   second check on, when grad > prev / 10 (a step no longer gains: the rounding floor).
// The first check's grad is small by construction (the Gram route's factor reproduces G), so
// it counts only with the orthogonality and is not a reference for the next one.
// done: the gate of the step's kernels; ctl: [0] steps taken, [1] checks made; hist: [0] the
// previous check's grad, [1] the last grad, [2] the last orth. No-op once done.
extern "C" __global__ void newton_check_f64(const double* v, const double* ptp, const double* g, int d, int k, double grad_rel, double orth_tol, int* done, int* ctl, double* hist) {
    __shared__ double scratch[33];
    if (*done) return;
    double sv = 0.0, sg = 0.0, orth = 0.0;
    for (long long e = threadIdx.x; e < (long long)d * k; e += blockDim.x) {
        sv += v[e] * v[e];
        sg += g[e] * g[e];
    }
    for (long long e = threadIdx.x; e < (long long)k * k; e += blockDim.x)
        orth = fmax(orth, fabs(ptp[e] - (e / k == e % k ? 1.0 : 0.0)));
    sv = etf::block_sum(sv, scratch);
    sg = etf::block_sum(sg, scratch);
    orth = etf::block_reduce(orth, scratch, 0.0, etf::Max());
    if (threadIdx.x != 0) return;
    const double grad = sqrt(sv);
    const bool first = ctl[1] == 0;
    bool stop = grad <= grad_rel * sqrt(sg) && orth <= orth_tol;
    if (!first && grad > 0.1 * hist[0]) stop = true;
    hist[0] = first ? INFINITY : grad;
    hist[1] = grad;
    hist[2] = orth;
    ctl[1] += 1;
    if (stop)
        *done = 1;
    else
        ctl[0] += 1;
}

// dst <- src (len doubles) unless *gate != 0 (a Newton step's result, kept only when the step
// was taken).
extern "C" __global__ void take_step_f64(double* dst, const double* src, long long len, const int* gate) {
    if (*gate) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += stride) dst[e] = src[e];
}
