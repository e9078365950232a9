// Warm-started refinement of a symmetric eigendecomposition, made of products
// (Ogita & Aishima, "Iterative refinement for symmetric eigenvalue decomposition", Japan J.
// Indust. Appl. Math. 35, 2018, Algorithm 1). With X the current approximate eigenvectors of
// a symmetric A (for the head: the previous step's eigenvectors, applied to this step's
// Gram matrix), one iteration is
//   C = X^T X,  S = X^T (A X)                            three products (src/gpu/linalg.rs)
//   R = I - C,  l_i = S_ii / (1 - R_ii)                  approximate eigenvalues
//   E_ii = R_ii / 2
//   E_ij = (S_ij + l_j R_ij) / (l_j - l_i)               a well-separated pair
//   E_ij = R_ij / 2                                      a cluster pair (see below)
//   X <- X (I + E)                                       one product
// and converges quadratically for well-separated eigenvalues: both the orthogonality defect R
// and the off-diagonal of S go from e to ~e^2 / gap. A pair is a *cluster* pair when its gap
// is below 100 (|S_ij| + max(|l_i|, |l_j|) |R_ij|), i.e. when the first-order rotation angle
// would exceed 0.01: the linearisation no longer holds, and the rotations' second-order
// orthogonality loss (the sum of the squared angles) would grow; nearly equal eigenvalues
// (collapsed features give K - 1 of them). Such a pair is only re-orthogonalised here; the
// one-block Jacobi that follows the iterations (jacobi_factor_f64 on X^T A X) rotates it
// exactly. The rule is symmetric in (i, j), so E's cluster part stays symmetric.
#include "etf_cuda.h"

// f = I + E (k x k, row-major) from c = X^T X (null: the identity, for X = I, the first
// iteration in the start basis) and s = X^T A X. orth_only: E = R / 2 alone
// (f = (3 I - c) / 2, s not read): the Newton–Schulz step that ends the refinement, taking an
// orthogonality defect R to 3/4 R^2 + O(R^3). Grid-stride: any launch shape.
extern "C" __global__ void refine_correction_f64(const double* opt_c, const double* s, int k, int orth_only, double* f) {
    const long long kk = (long long)k * k;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < kk; e += stride) {
        const int i = (int)(e / k), j = (int)(e % k);
        const double* c = opt_c;
        const double r = c ? (i == j ? 1.0 : 0.0) - c[e] : 0.0;
        double v;
        if (i == j || orth_only) {
            v = (i == j ? 1.0 : 0.0) + 0.5 * r;
        } else {
            const double ci = c ? c[(size_t)i * k + i] : 1.0, cj = c ? c[(size_t)j * k + j] : 1.0;
            const double li = s[(size_t)i * k + i] / ci, lj = s[(size_t)j * k + j] / cj;
            const double gap = lj - li;
            const double sij = s[e];
            const double scale = fabs(sij) + fmax(fabs(li), fabs(lj)) * fabs(r);
            v = fabs(gap) > 100.0 * scale && gap != 0.0 ? (sij + lj * r) / gap : 0.5 * r;
        }
        f[e] = v;
    }
}
