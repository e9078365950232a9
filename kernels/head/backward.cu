// The implicit backward (docs/backward.md): the tangent-space solve in the eigenbasis of
// B = sym(P^T G) = Q diag(s) Q^T, with U = P Q. Given V = dL/dP:
//   Z = U^T V Q                      gemm, gemm
//   T_ij = (Z_ij s_i + Z_ji s_j) / (s_i + s_j)            tangent_t
//   u = (U T - V Q) (Q diag(1/s))^T  gemm (beta = -1, in place), gemm
//   dL/dY = -c u M                   dy_from_u (row-mean removal, to f32)
// float64 up to dL/dY. Grid-stride loops: any launch shape.
#include "etf_cuda.h"

// status[5] <- 3 when some s_i + s_j is zero (singular Lagrangian Hessian; the CPU test).
// s_max[0] = max |s| (written by jacobi_factor_f64).
extern "C" __global__ void tangent_t_f64(const double* z, const double* s, const double* s_max, int k, double* t, int* status) {
    const double scale = s_max[0];
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)k * k; e += stride) {
        int i = (int)(e / k), j = (int)(e % k);
        double den = s[i] + s[j];
        if (!(fabs(den) > 1e-300 && fabs(den) > 1e-15 * scale)) {
            status[5] = 3;
            t[e] = 0.0;
            continue;
        }
        t[e] = (z[e] * s[i] + z[(size_t)j * k + i] * s[j]) / den;
    }
}

// One row group per row j (etf::RowGroups: a warp on a GPU; 1D grid, blockDim a multiple of 32):
// dy[j][c] = -cc (u[j][c] - mean_c u[j][.]) as f32, and <Y, dY> (the Frobenius
// normalisation's backward needs it) by the last block to finish (etf::grid_sum_last: a fixed
// order, float64): dot[0]. partials: gridDim.x doubles; ticket: 0 between launches.
extern "C" __global__ void dy_from_u_f64(const double* u, const float* y, int d, int k, double cc, float* dy, double* partials, int* ticket, double* dot, int lanes) {
    __shared__ double scratch[33];
    const etf::RowGroups w(lanes);
    double part = 0.0;
    for (int j = w.first; j < d; j += w.stride) {
        const double* ur = u + (size_t)j * k;
        double m = 0.0;
        for (int c = w.lane; c < k; c += w.lanes) m += ur[c];
        m = w.sum(m) / k;
        for (int c = w.lane; c < k; c += w.lanes) {
            const float v = (float)(-cc * (ur[c] - m));
            dy[(size_t)j * k + c] = v;
            part += (double)y[(size_t)j * k + c] * (double)v;
        }
    }
    part = etf::block_sum(part, scratch);
    double total = 0.0;
    if (etf::grid_sum_last(part, partials, ticket, &total) && threadIdx.x == 0) dot[0] = total;
}
