// Symmetric eigensolver for the K x K float64 matrices of the ETF solve (docs/solve.md): the
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
//
// Two solvers share the rotation code:
// - jacobi_eig_f64: the whole matrix in one block (K <= 1024). A round touches all of A, so
//   one SM streams ~2 K^2 doubles per round: fine for small K, slow for large K.
// - bj_*: block Jacobi over many blocks (any K). Indices are cut into column blocks of width
//   b (<= 24); a round pairs the blocks round-robin, and each pair's 2b x 2b diagonal
//   sub-problem is diagonalised in its own CUDA block (bj_local, the one-block solver on a
//   shared-memory copy, accumulating its rotation R_pair). bj_apply then updates all of A
//   as A <- J^T A J with J block-diagonal in the pairing: tile (P, Q) of the pair-permuted A
//   becomes R_P^T A_PQ R_Q, each tile in its own CUDA block, in place, and V <- V J. A sweep
//   is nb - 1 rounds (nb = number of column blocks, rounded up to even); it stops after a
//   sweep in which no pair rotated, with the same rotation test as the one-block solver, so
//   both end at the same accuracy. The host launches a fixed number of sweeps; a device
//   flag (bj_sweep_end) turns the launches after convergence into no-ops.
#include "etf_cuda.h"


namespace etf {

// Pair i (0 <= i < m/2) of round r (0 <= r < m - 1) of the round-robin ("circle") ordering
// of m (even) indices, p < q: over m - 1 rounds every pair meets exactly once.
__device__ __forceinline__ void round_robin_pair(int r, int m, int i, int* p, int* q) {
    int a, c;
    if (i == 0) {
        a = r;
        c = m - 1;
    } else {
        a = (r + i) % (m - 1);
        c = (r - i + (m - 1)) % (m - 1);
    }
    *p = a < c ? a : c;
    *q = a < c ? c : a;
}

// Parallel cyclic Jacobi on the k x k symmetric matrix a (row-major, leading dimension k),
// accumulating the rotations into v (v <- v J), by the threads of one block. floor_abs: the
// absolute part of the rotation test. Returns the sweeps used; *converged tells whether the
// last sweep rotated nothing. Every thread of the block must call it. MAXP >= (k + 1) / 2.
template <int MAXP>
__device__ int jacobi_sweeps(double* a, double* v, int k, int max_sweeps, double floor_abs, bool* converged_out, double tol_rel = 2.220446049250313e-16) {
    __shared__ int pp[MAXP], qq[MAXP];
    __shared__ double cs[MAXP], sn[MAXP];
    __shared__ double dp[MAXP], dq[MAXP];
    __shared__ int act[MAXP];
    const int tid = threadIdx.x, nt = blockDim.x;
    const int m = k + (k & 1), half = m / 2;
    int sweep = 0;
    bool converged = k < 2;
    while (!converged && sweep < max_sweeps) {
        int rotated = 0;
        for (int r = 0; r < m - 1; r++) {
            // 1. Rotations of this round.
            int round_on = 0;
            for (int i = tid; i < half; i += nt) {
                int p, q;
                round_robin_pair(r, m, i, &p, &q);
                pp[i] = p;
                qq[i] = q;
                int on = 0;
                double c = 1.0, s = 0.0;
                if (q < k) {
                    double apq = a[(size_t)p * k + q];
                    double app = a[(size_t)p * k + p], aqq = a[(size_t)q * k + q];
                    if (fabs(apq) > floor_abs && fabs(apq) > tol_rel * sqrt(fabs(app * aqq))) {
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
                round_on |= on;
            }
            rotated |= round_on;
            // A round in which no pair rotates leaves A and V as they are.
            if (!__syncthreads_or(round_on)) continue;
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
    *converged_out = converged;
    return sweep;
}

// eps ||A||_F of the n doubles of a, by the threads of one block (etf::block_sum: fixed
// order; blockDim a multiple of 32). Every thread gets the value.
__device__ __forceinline__ double rounding_floor(const double* a, long long n) {
    __shared__ double scratch[33];
    double part = 0.0;
    for (long long e = threadIdx.x; e < n; e += blockDim.x) part += a[e] * a[e];
    return 2.220446049250313e-16 * sqrt(block_sum(part, scratch));
}

}  // namespace etf

// a: K x K symmetric, row-major (destroyed: ends diagonal to rounding). v: K x K (in: start
// basis; out: eigenvectors as columns). lam: K eigenvalues (unsorted, matching v's columns).
// info[0] <- sweeps used. On no convergence within max_sweeps, status[3] <- 2.
// One block of any multiple of 32 threads (<= 1024); K <= 1024. gate: null, or a device flag
// that makes the launch a no-op when nonzero (as in gemm.cu).
extern "C" __global__ void __launch_bounds__(1024) jacobi_eig_f64(double* a, double* v, int k, int max_sweeps, double* lam, int* info, int* status, const int* gate) {
    if (gate && *gate) return;
    const double floor_abs = etf::rounding_floor(a, (long long)k * k);
    bool converged;
    const int sweep = etf::jacobi_sweeps<512>(a, v, k, max_sweeps, floor_abs, &converged);
    for (int i = threadIdx.x; i < k; i += blockDim.x) lam[i] = a[(size_t)i * k + i];
    if (threadIdx.x == 0) {
        info[0] = sweep;
        if (!converged) status[3] = 2;
    }
}

namespace etf {

// The tail of jacobi_factor_f64 / jacobi_refined_f64 (see there), v already holding the start
// basis; every thread of the block calls it. Returns nothing; writes the outputs.
__device__ __forceinline__ void factor_tail(double* a, double* v, int k, int max_sweeps, double tol_rel, int mode, double* s, double* s_inv, double* vs, double* s_max, int* info, int* status) {
    __shared__ double scratch[33];
    const int tid = threadIdx.x, nt = blockDim.x;
    const long long kk = (long long)k * k;
    const double floor_abs = rounding_floor(a, kk);
    // One coalesced pass first: when no pair needs a rotation (a refined warm start), the
    // sweeps, whose rounds each cost a barrier, are skipped.
    int need = 0;
    for (long long e = tid; e < kk && !need; e += nt) {
        const long long p = e / k, q = e % k;
        if (q <= p) continue;
        const double apq = a[e];
        need = fabs(apq) > floor_abs && fabs(apq) > tol_rel * sqrt(fabs(a[p * k + p] * a[q * k + q]));
    }
    bool converged = true;
    int sweep = 0;
    if (__syncthreads_or(need)) sweep = jacobi_sweeps<512>(a, v, k, max_sweeps, floor_abs, &converged, tol_rel);
    double hi = -INFINITY, lo = INFINITY, amax = 0.0;
    int zero = 0;
    for (int i = tid; i < k; i += nt) {
        const double l = a[(size_t)i * k + i];
        hi = fmax(hi, l);
        lo = fmin(lo, l);
        amax = fmax(amax, fabs(l));
        zero |= l == 0.0;
    }
    hi = block_reduce(hi, scratch, (double)-INFINITY, Max());
    lo = -block_reduce(-lo, scratch, (double)-INFINITY, Max());
    amax = block_reduce(amax, scratch, 0.0, Max());
    zero = __syncthreads_or(zero);
    const bool ok = mode ? (hi > 0.0 && lo > hi * 1e-28) : !zero;
    for (int i = tid; i < k; i += nt) {
        const double l = a[(size_t)i * k + i];
        const double sv = mode ? sqrt(fmax(l, 0.0)) : l;
        s[i] = sv;
        s_inv[i] = ok && sv != 0.0 ? 1.0 / sv : 0.0;
    }
    __syncthreads();
    for (long long e = tid; e < kk; e += nt) vs[e] = v[e] * s_inv[e % k];
    if (tid == 0) {
        info[0] = sweep;
        s_max[0] = mode ? sqrt(fmax(hi, 0.0)) : amax;
        if (!converged) status[3] = 2;
        if (!ok) status[3] = 1;
    }
}

}  // namespace etf

// The factorisation a polar decomposition needs, in one launch of one block: the cyclic
// Jacobi above on a (K x K, destroyed), then the spectrum's square roots and their inverses.
//   v:      in: opt_v0 (the start basis; the identity when null); out: eigenvectors (columns).
//   mode 1: a is a Gram matrix G^T G (or Q0^T G^T G Q0): s = sqrt(lambda); rank deficient
//           (status[3] <- 1) when lambda_max <= 0 or lambda_min <= 1e-28 lambda_max.
//   mode 0: a is symmetric B itself: s = lambda (any sign); a zero eigenvalue is a failure.
//   s_inv = 1 / s (0 on failure), vs = v diag(s_inv) (K x K), s_max[0] = max |s|,
//   info[0] = sweeps used, info[1] = 0 (jacobi_refined_f64's fallback flag); no convergence
//   within max_sweeps: status[3] <- 2 (rank deficiency takes precedence).
// tol_rel: the relative rotation test |a_pq| > tol_rel sqrt(|a_pp a_qq|) (eps: to rounding
// level), with the absolute floor eps ||A||_F. A first pass over A skips the sweeps when no
// pair fails the test (info[0] = 0).
// in_shared: the sweeps run on copies of A and V in the launch's dynamic shared memory
// (2 K^2 doubles: K <= 113 fits Hopper's 227 KiB with the sweeps' static arrays), so a
// round's row and column updates stay on the SM instead of going through L2; V is written
// back at the end (A is not: only its diagonal is used, read from the copy).
// One block, blockDim a multiple of 32 (<= 1024); K <= 1024. gate as in gemm.cu.
extern "C" __global__ void __launch_bounds__(1024) jacobi_factor_f64(double* a, const double* opt_v0, double* v, int k, int max_sweeps, double tol_rel, int mode, int in_shared, double* s, double* s_inv, double* vs, double* s_max, int* info, int* status, const int* gate) {
    extern __shared__ double smem[];
    if (gate && *gate) return;
    const long long kk = (long long)k * k;
    double* wa = in_shared ? smem : a;
    double* wv = in_shared ? smem + kk : v;
    for (long long e = threadIdx.x; e < kk; e += blockDim.x) {
        wv[e] = opt_v0 ? opt_v0[e] : (e / k == e % k ? 1.0 : 0.0);
        if (in_shared) wa[e] = a[e];
    }
    if (threadIdx.x == 0) info[1] = 0;
    __syncthreads();
    etf::factor_tail(wa, wv, k, max_sweeps, tol_rel, mode, s, s_inv, vs, s_max, info, status);
    if (in_shared) {
        __syncthreads();
        for (long long e = threadIdx.x; e < kk; e += blockDim.x) v[e] = wv[e];
    }
}

// The end of a refined eigensolve (refine.cu), with its fallback decided on the device:
// x is the refined basis after its Newton–Schulz steps X (3 I - C) / 2, c = X^T X taken
// before the first, sx = x^T A x; a0 = q0^T A q0 with q0 the unrefined start (null: the
// identity, a0 = A). When ||c - I||_F <= 1e-3, x is orthonormal to rounding level (two
// steps leave 3/4 (3/4 ||R||^2)^2 <= 4e-13) and the Jacobi tail runs on sx from v = x with the relative threshold
// tol_rel (it rotates what the refinement left: pairs of nearly equal eigenvalues);
// otherwise the refinement diverged (a start too far away) and it runs on a0 from v = q0 to
// rounding level: the plain warm one-block solve. info[1] <- 1 when the fallback ran. Gram
// mode (s = sqrt(lambda)). One block as jacobi_factor_f64.
extern "C" __global__ void __launch_bounds__(1024) jacobi_refined_f64(double* sx, const double* x, const double* c, double* a0, const double* opt_q0, double* v, int k, int max_sweeps, double tol_rel, double* s, double* s_inv, double* vs, double* s_max, int* info, int* status) {
    __shared__ double scratch[33];
    const long long kk = (long long)k * k;
    double dev = 0.0;
    for (long long e = threadIdx.x; e < kk; e += blockDim.x) {
        const double r = c[e] - (e / k == e % k ? 1.0 : 0.0);
        dev += r * r;
    }
    dev = etf::block_sum(dev, scratch);
    const bool refined = sqrt(dev) <= 1e-3;  // NaN fails too
    for (long long e = threadIdx.x; e < kk; e += blockDim.x)
        v[e] = refined ? x[e] : opt_q0 ? opt_q0[e] : (e / k == e % k ? 1.0 : 0.0);
    __syncthreads();
    if (threadIdx.x == 0) info[1] = refined ? 0 : 1;
    etf::factor_tail(refined ? sx : a0, v, k, max_sweeps, refined ? tol_rel : 2.220446049250313e-16, 1, s, s_inv, vs, s_max, info, status);
}

// ---- block Jacobi (many blocks) -----------------------------------------------------------

#define ETF_BJ_MAX_WIDTH 24

namespace etf {

// Global index of local index li (0 <= li < 2b) of the pair (p, q) of column blocks, or -1
// for a padding index (beyond K).
__device__ __forceinline__ int bj_index(int p, int q, int b, int k, int li) {
    int g = li < b ? p * b + li : q * b + (li - b);
    return g < k ? g : -1;
}

}  // namespace etf

// Start of a block-Jacobi solve: fl[0] <- eps ||A||_F (the absolute rotation floor), flags
// cleared. One block (multiple of 32 threads). fl: double[1]; flags: int[3] = {rotated this
// sweep, converged, sweeps}. gate as in gemm.cu.
extern "C" __global__ void bj_init_f64(const double* a, int k, double* fl, int* flags, const int* gate) {
    if (gate && *gate) return;
    const double f = etf::rounding_floor(a, (long long)k * k);
    if (threadIdx.x == 0) {
        fl[0] = f;
        flags[0] = 0;
        flags[1] = k < 2 ? 1 : 0;
        flags[2] = 0;
    }
}

// Round r: each CUDA block takes pairs blockIdx.x, +gridDim.x, ...: loads its 2b x 2b
// diagonal sub-problem into dynamic shared memory (2b x 2b doubles), diagonalises it with
// the one-block solver (at most max_inner sweeps), writes it back into A (the pairs' index
// sets are disjoint, so the diagonal tiles are this kernel's alone; bj_apply skips them), and
// writes R_pair (rot, 2b x 2b per pair, row-major) and whether it rotated (act, per pair;
// flags[0] <- 1 then). Padding indices are zero rows: never rotated. Blocks of a multiple of
// 32 threads. No-op when converged (flags[1]) or gated.
extern "C" __global__ void bj_local_f64(double* a, int k, int b, int r, int nb, int max_inner, const double* fl, double* rot, int* act, int* flags, const int* gate) {
    extern __shared__ double sub[];
    if ((gate && *gate) || flags[1]) return;
    const int n2 = 2 * b, npairs = nb / 2, tid = threadIdx.x, nt = blockDim.x;
    for (int pair = blockIdx.x; pair < npairs; pair += gridDim.x) {
        int p, q;
        etf::round_robin_pair(r, nb, pair, &p, &q);
        double* rp = rot + (size_t)pair * n2 * n2;
        for (int e = tid; e < n2 * n2; e += nt) {
            int li = e / n2, lj = e % n2;
            int gi = etf::bj_index(p, q, b, k, li), gj = etf::bj_index(p, q, b, k, lj);
            sub[e] = (gi >= 0 && gj >= 0) ? a[(size_t)gi * k + gj] : 0.0;
            rp[e] = li == lj ? 1.0 : 0.0;
        }
        __syncthreads();
        bool converged;
        int sweeps = etf::jacobi_sweeps<ETF_BJ_MAX_WIDTH>(sub, rp, n2, max_inner, fl[0], &converged);
        const int on = sweeps > 1 || !converged;
        if (on)
            for (int e = tid; e < n2 * n2; e += nt) {
                int gi = etf::bj_index(p, q, b, k, e / n2), gj = etf::bj_index(p, q, b, k, e % n2);
                if (gi >= 0 && gj >= 0) a[(size_t)gi * k + gj] = sub[e];
            }
        if (tid == 0) {
            act[pair] = on;
            if (on) flags[0] = 1;
        }
        __syncthreads();
    }
}

// Round r: A <- J^T A J and V <- V J. Work items: the npairs^2 tiles (P, Q) of A (tile =
// rows of pair P x columns of pair Q: R_P^T A_PQ R_Q, in place; the diagonal tiles P = Q were
// written by bj_local), then the ceil(K / 2b) x npairs tiles of V (rows chunk x columns of
// pair Q: V_Q R_Q). Tiles whose pairs did not rotate are skipped. Dynamic shared memory:
// 2 (2b)^2 doubles. Blocks of any size. No-op when converged or gated.
extern "C" __global__ void bj_apply_f64(double* a, double* v, int k, int b, int r, int nb, const double* rot, const int* act, const int* flags, const int* gate) {
    extern __shared__ double tile[];
    if ((gate && *gate) || flags[1]) return;
    const int n2 = 2 * b, npairs = nb / 2, tid = threadIdx.x, nt = blockDim.x;
    double* w = tile + n2 * n2;
    const int ta = npairs * npairs, tv = ((k + n2 - 1) / n2) * npairs;
    for (int t = blockIdx.x; t < ta + tv; t += gridDim.x) {
        if (t < ta) {
            const int P = t / npairs, Q = t % npairs;
            const int actp = act[P], actq = act[Q];
            if (P == Q || (!actp && !actq)) continue;
            int p0, p1, q0, q1;
            etf::round_robin_pair(r, nb, P, &p0, &p1);
            etf::round_robin_pair(r, nb, Q, &q0, &q1);
            const double* rp = rot + (size_t)P * n2 * n2;
            const double* rq = rot + (size_t)Q * n2 * n2;
            for (int e = tid; e < n2 * n2; e += nt) {
                int gi = etf::bj_index(p0, p1, b, k, e / n2), gj = etf::bj_index(q0, q1, b, k, e % n2);
                tile[e] = (gi >= 0 && gj >= 0) ? a[(size_t)gi * k + gj] : 0.0;
            }
            __syncthreads();
            // w = A_PQ R_Q
            for (int e = tid; e < n2 * n2; e += nt) {
                int i = e / n2, j = e % n2;
                double s = 0.0;
                if (actq)
                    for (int x = 0; x < n2; x++) s += tile[i * n2 + x] * rq[x * n2 + j];
                else
                    s = tile[e];
                w[e] = s;
            }
            __syncthreads();
            // A_PQ <- R_P^T w
            for (int e = tid; e < n2 * n2; e += nt) {
                int i = e / n2, j = e % n2;
                int gi = etf::bj_index(p0, p1, b, k, i), gj = etf::bj_index(q0, q1, b, k, j);
                if (gi < 0 || gj < 0) continue;
                double s = 0.0;
                if (actp)
                    for (int x = 0; x < n2; x++) s += rp[x * n2 + i] * w[x * n2 + j];
                else
                    s = w[e];
                a[(size_t)gi * k + gj] = s;
            }
            __syncthreads();
        } else {
            const int c = (t - ta) / npairs, Q = (t - ta) % npairs;
            if (!act[Q]) continue;
            int q0, q1;
            etf::round_robin_pair(r, nb, Q, &q0, &q1);
            const double* rq = rot + (size_t)Q * n2 * n2;
            for (int e = tid; e < n2 * n2; e += nt) {
                int row = c * n2 + e / n2, gj = etf::bj_index(q0, q1, b, k, e % n2);
                tile[e] = (row < k && gj >= 0) ? v[(size_t)row * k + gj] : 0.0;
            }
            __syncthreads();
            for (int e = tid; e < n2 * n2; e += nt) {
                int i = e / n2, j = e % n2;
                int row = c * n2 + i, gj = etf::bj_index(q0, q1, b, k, j);
                if (row >= k || gj < 0) continue;
                double s = 0.0;
                for (int x = 0; x < n2; x++) s += tile[i * n2 + x] * rq[x * n2 + j];
                v[(size_t)row * k + gj] = s;
            }
            __syncthreads();
        }
    }
}

// End of a sweep (one thread): counts it, and marks the solve converged when no pair
// rotated. No-op once converged or gated.
extern "C" __global__ void bj_sweep_end_i32(int* flags, const int* gate) {
    if (threadIdx.x != 0 || blockIdx.x != 0 || (gate && *gate) || flags[1]) return;
    flags[2] += 1;
    if (flags[0] == 0) flags[1] = 1;
    flags[0] = 0;
}

// End of the solve: lam <- diag(A), info[0] <- sweeps; no convergence sets status[3] <- 2.
// Grid-stride. No-op when gated.
extern "C" __global__ void bj_finish_f64(const double* a, int k, const int* flags, double* lam, int* info, int* status, const int* gate) {
    if (gate && *gate) return;
    const int stride = gridDim.x * blockDim.x, id = blockIdx.x * blockDim.x + threadIdx.x;
    for (int i = id; i < k; i += stride) lam[i] = a[(size_t)i * k + i];
    if (id == 0) {
        info[0] = flags[2];
        if (!flags[1]) status[3] = 2;
    }
}
