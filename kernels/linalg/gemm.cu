// Dense products C = alpha * op(A) op(B) + beta * C, row-major, f64 and f32 (docs/solve.md#the-closed-form, docs/backward.md#the-closed-form-in-the-eigenbasis:
// the Gram matrix G^T G, the products with G, P, U, Q and V, the classifier's X W^T).
//
// op(A) is m x l (A stored m x l, or l x m when ta = 1); op(B) is l x n (B stored l x n, or
// n x l when tb = 1); C is m x n. beta = 0 overwrites C without reading it.
// gate: null, or a device flag; when *gate != 0 the launch does nothing (the Newton polish
// stops this way without a host decision, src/gpu/solve.rs).
//
// Two kernels with identical results up to summation order:
// - gemm_*_tiled: 64 x 64 output tile per block of 256 threads (4 x 4 per thread), 16-deep
//   shared-memory panels. The GPU path.
// - gemm_*_direct: no shared memory and no barrier; each thread computes 4 x 4 outputs by a
//   grid-stride loop over tiles. The CPU execution's path (real-thread barriers cost ~0.1 ms
//   each there) and a fallback.
#include "etf_cuda.h"

namespace etf {

template <typename T>
__device__ __forceinline__ T load_op(const T* a, int ta, int rows, int cols, int i, int j) {
    // Element (i, j) of op(A), op(A) being rows x cols.
    return ta ? a[(size_t)j * rows + i] : a[(size_t)i * cols + j];
}

template <typename T>
__device__ __forceinline__ void gemm_tiled(int ta, int tb, int m, int n, int l, T alpha, const T* a, const T* b, T beta, T* c, const int* gate) {
    if (gate && *gate) return;
    constexpr int BM = 64, BN = 64, BK = 16;
    __shared__ T as[BK][BM + 1];
    __shared__ T bs[BK][BN + 1];
    const int tid = threadIdx.x;
    const int tr = tid / 16, tc = tid % 16;  // 16 x 16 threads, 4 x 4 outputs each
    for (int tile = blockIdx.x; tile < ((m + BM - 1) / BM) * ((n + BN - 1) / BN); tile += gridDim.x) {
        const int tiles_n = (n + BN - 1) / BN;
        const int i0 = (tile / tiles_n) * BM, j0 = (tile % tiles_n) * BN;
        T acc[4][4];
        for (int x = 0; x < 4; x++)
            for (int y = 0; y < 4; y++) acc[x][y] = T(0);
        for (int k0 = 0; k0 < l; k0 += BK) {
            // 1024 elements of each panel, 4 per thread.
            for (int e = tid; e < BM * BK; e += 256) {
                int r = e % BM, kk = e / BM;
                int i = i0 + r, kx = k0 + kk;
                as[kk][r] = (i < m && kx < l) ? load_op(a, ta, m, l, i, kx) : T(0);
                int cc = e % BN;
                int j = j0 + cc;
                bs[kk][cc] = (j < n && kx < l) ? load_op(b, tb, l, n, kx, j) : T(0);
            }
            __syncthreads();
            for (int kk = 0; kk < BK; kk++) {
                T ra[4], rb[4];
                for (int x = 0; x < 4; x++) ra[x] = as[kk][tr + 16 * x];
                for (int y = 0; y < 4; y++) rb[y] = bs[kk][tc + 16 * y];
                for (int x = 0; x < 4; x++)
                    for (int y = 0; y < 4; y++) acc[x][y] += ra[x] * rb[y];
            }
            __syncthreads();
        }
        for (int x = 0; x < 4; x++) {
            int i = i0 + tr + 16 * x;
            if (i >= m) continue;
            for (int y = 0; y < 4; y++) {
                int j = j0 + tc + 16 * y;
                if (j >= n) continue;
                size_t o = (size_t)i * n + j;
                c[o] = beta == T(0) ? alpha * acc[x][y] : alpha * acc[x][y] + beta * c[o];
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void gemm_direct(int ta, int tb, int m, int n, int l, T alpha, const T* a, const T* b, T beta, T* c, const int* gate) {
    if (gate && *gate) return;
    const int tm = (m + 3) / 4, tn = (n + 3) / 4;
    const long long tiles = (long long)tm * tn;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < tiles; t += stride) {
        const int i0 = (int)(t / tn) * 4, j0 = (int)(t % tn) * 4;
        T acc[4][4];
        for (int x = 0; x < 4; x++)
            for (int y = 0; y < 4; y++) acc[x][y] = T(0);
        for (int kk = 0; kk < l; kk++) {
            T ra[4], rb[4];
            for (int x = 0; x < 4; x++) ra[x] = i0 + x < m ? load_op(a, ta, m, l, i0 + x, kk) : T(0);
            for (int y = 0; y < 4; y++) rb[y] = j0 + y < n ? load_op(b, tb, l, n, kk, j0 + y) : T(0);
            for (int x = 0; x < 4; x++)
                for (int y = 0; y < 4; y++) acc[x][y] += ra[x] * rb[y];
        }
        for (int x = 0; x < 4 && i0 + x < m; x++)
            for (int y = 0; y < 4 && j0 + y < n; y++) {
                size_t o = (size_t)(i0 + x) * n + (j0 + y);
                c[o] = beta == T(0) ? alpha * acc[x][y] : alpha * acc[x][y] + beta * c[o];
            }
    }
}

}  // namespace etf

// Launch with 256 threads per block (any grid size; tiles are grid-strided).
extern "C" __global__ void gemm_tiled_f64(int ta, int tb, int m, int n, int l, double alpha, const double* a, const double* b, double beta, double* c, const int* gate) {
    etf::gemm_tiled(ta, tb, m, n, l, alpha, a, b, beta, c, gate);
}
extern "C" __global__ void gemm_tiled_f32(int ta, int tb, int m, int n, int l, float alpha, const float* a, const float* b, float beta, float* c, const int* gate) {
    etf::gemm_tiled(ta, tb, m, n, l, alpha, a, b, beta, c, gate);
}
// Any launch shape.
extern "C" __global__ void gemm_direct_f64(int ta, int tb, int m, int n, int l, double alpha, const double* a, const double* b, double beta, double* c, const int* gate) {
    etf::gemm_direct(ta, tb, m, n, l, alpha, a, b, beta, c, gate);
}
extern "C" __global__ void gemm_direct_f32(int ta, int tb, int m, int n, int l, float alpha, const float* a, const float* b, float beta, float* c, const int* gate) {
    etf::gemm_direct(ta, tb, m, n, l, alpha, a, b, beta, c, gate);
}
