// Symmetric eigensolver for the K x K float64 matrices of the ETF solve (method.md §3): the
// Gram matrix G^T G, whose eigenpairs give the polar factor P = G Q S^{-1} Q^T and the
// factor B = sym(P^T G) = Q S Q^T that the implicit backward needs.
//
// Parallel cyclic two-sided Jacobi in one block. Each sweep visits every pair (p, q) once, in
// m - 1 rounds of m/2 disjoint pairs (round-robin "circle" ordering, m = K rounded up to even;
// the extra index of an odd K is a dummy). A round computes the m/2 rotations, applies them to
// the rows, then to the columns of A and of V (V <- V J), and writes the rotated 2 x 2
// diagonal exactly. A pair is rotated when |a_pq| > eps sqrt(|a_pp a_qq|) (relative,
// de Rijk) and |a_pq| > eps ||A||_F (the rounding floor of a matrix formed in float64); the
// solve stops after the first sweep that rotated nothing.
//
// Warm start: pass A' = Q0^T A Q0 and V = Q0 (the previous step's eigenvectors); A' is then
// nearly diagonal and one to three sweeps suffice. Cold start: A and V = I.
#include "etf_cuda.h"

#define ETF_JACOBI_MAX_PAIRS 512

// a: K x K symmetric, row-major (destroyed: ends diagonal to rounding). v: K x K (in: start
// basis; out: eigenvectors as columns). lam: K eigenvalues (unsorted, matching v's columns).
// info[0] <- sweeps used. On no convergence within max_sweeps, status[3] <- 2.
// One block of any multiple of 32 threads (<= 1024); K <= 1024. gate: null, or a device flag
// that makes the launch a no-op when nonzero (as in gemm.cu).
extern "C" __global__ void jacobi_eig_f64(double* a, double* v, int k, int max_sweeps, double* lam, int* info, int* status, const int* gate) {
    if (gate && *gate) return;
    __shared__ int pp[ETF_JACOBI_MAX_PAIRS], qq[ETF_JACOBI_MAX_PAIRS];
    __shared__ double cs[ETF_JACOBI_MAX_PAIRS], sn[ETF_JACOBI_MAX_PAIRS];
    __shared__ double dp[ETF_JACOBI_MAX_PAIRS], dq[ETF_JACOBI_MAX_PAIRS];
    __shared__ int act[ETF_JACOBI_MAX_PAIRS];
    __shared__ double scratch[33];
    const double eps = 2.220446049250313e-16;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int m = k + (k & 1), half = m / 2;

    // ||A||_F (fixed order: strided partial sums, then a shuffle tree).
    double part = 0.0;
    for (long long e = tid; e < (long long)k * k; e += nt) part += a[e] * a[e];
    __syncthreads();
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if ((tid & 31) == 0) scratch[tid >> 5] = part;
    __syncthreads();
    if (tid == 0) {
        double s = 0.0;
        for (int w = 0; w < (nt + 31) / 32; w++) s += scratch[w];
        scratch[32] = sqrt(s);
    }
    __syncthreads();
    const double floor_abs = eps * scratch[32];

    int sweep = 0;
    bool converged = k < 2;
    while (!converged && sweep < max_sweeps) {
        int rotated = 0;
        for (int r = 0; r < m - 1; r++) {
            // 1. Rotations of this round.
            for (int i = tid; i < half; i += nt) {
                int p, q;
                if (i == 0) {
                    p = r;
                    q = m - 1;
                } else {
                    p = (r + i) % (m - 1);
                    q = (r - i + (m - 1)) % (m - 1);
                }
                if (p > q) {
                    int t = p;
                    p = q;
                    q = t;
                }
                pp[i] = p;
                qq[i] = q;
                int on = 0;
                double c = 1.0, s = 0.0;
                if (q < k) {
                    double apq = a[(size_t)p * k + q];
                    double app = a[(size_t)p * k + p], aqq = a[(size_t)q * k + q];
                    if (fabs(apq) > floor_abs && fabs(apq) > eps * sqrt(fabs(app * aqq))) {
                        // Symmetric Schur decomposition (Golub & Van Loan, Alg. 8.4.1).
                        double theta = (aqq - app) / (2.0 * apq);
                        double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(1.0 + theta * theta));
                        c = 1.0 / sqrt(1.0 + t * t);
                        s = t * c;
                        dp[i] = app - t * apq;
                        dq[i] = aqq + t * apq;
                        on = 1;
                    }
                }
                cs[i] = c;
                sn[i] = s;
                act[i] = on;
                rotated |= on;
            }
            __syncthreads();
            // 2. Rows p, q of A: A <- J^T A.
            for (long long e = tid; e < (long long)half * k; e += nt) {
                int i = (int)(e / k), j = (int)(e % k);
                if (!act[i]) continue;
                size_t rp = (size_t)pp[i] * k + j, rq = (size_t)qq[i] * k + j;
                double x = a[rp], y = a[rq], c = cs[i], s = sn[i];
                a[rp] = c * x - s * y;
                a[rq] = s * x + c * y;
            }
            __syncthreads();
            // 3. Columns p, q of A and of V: A <- A J, V <- V J.
            for (long long e = tid; e < (long long)half * k; e += nt) {
                int i = (int)(e % half), row = (int)(e / half);
                if (!act[i]) continue;
                double c = cs[i], s = sn[i];
                size_t cp = (size_t)row * k + pp[i], cq = (size_t)row * k + qq[i];
                double x = a[cp], y = a[cq];
                a[cp] = c * x - s * y;
                a[cq] = s * x + c * y;
                x = v[cp];
                y = v[cq];
                v[cp] = c * x - s * y;
                v[cq] = s * x + c * y;
            }
            __syncthreads();
            // 4. The rotated 2 x 2 block, exactly.
            for (int i = tid; i < half; i += nt) {
                if (!act[i]) continue;
                int p = pp[i], q = qq[i];
                a[(size_t)p * k + p] = dp[i];
                a[(size_t)q * k + q] = dq[i];
                a[(size_t)p * k + q] = 0.0;
                a[(size_t)q * k + p] = 0.0;
            }
            __syncthreads();
        }
        converged = __syncthreads_or(rotated) == 0;
        sweep++;
    }
    for (int i = tid; i < k; i += nt) lam[i] = a[(size_t)i * k + i];
    if (tid == 0) {
        info[0] = sweep;
        if (!converged) status[3] = 2;
    }
}
