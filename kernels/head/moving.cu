// Moving class means (docs/head.md#moving-class-means) and their backward.
//
// The per-class column source is decided on the device by `step_begin_*` (stats.cu):
//   0 UPDATE    E_new = a * c_k + b * E_k     (class present)
//   1 UPDATE_MU E_new = a * mu  + b * E_k     (Reference policy, step 0, class absent)
//   2 SET_MU    E_new = mu, with gradient     (Reference policy, later, absent and unseen)
//   3 HOLD      E_new = E_k, no gradient      (Hold policy absent; Reference absent and seen)
// (a, b) = (alpha, 1 - alpha) for the exponential average, (1/(t+1), t/(t+1)) cumulative.
// They live on the device as `w` = [a, b, alpha_new, t] (f64), written by `step_begin_*`
// from the state scalars [t, alpha], so a step needs no host round trip.
#include "etf_cuda.h"

// Commit of a moving-mean update (grid-stride over max(d K, K)): E <- E_new, seen <- seen_new,
// scal <- [t + 1, alpha_new], unless the step's status records a forward error.
extern "C" __global__ void moving_commit_f32(float* e, int* seen, double* scal, const float* e_new, const int* seen_new, const double* w, int d, int k, const int* status) {
    if (!etf::forward_ok(status)) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = first; i < (long long)d * k; i += stride) e[i] = e_new[i];
    for (long long c = first; c < k; c += stride) seen[c] = seen_new[c];
    if (first == 0) {
        scal[0] = fmin(w[3] + 1.0, 9007199254740992.0);  // saturates at 2^53 (MAX_STEP)
        scal[1] = w[2];
    }
}

// moving_update_f32 and the Frobenius norm of its result in one launch (1D grid, blockDim a
// multiple of 32): e_new as above, and, by the last block to finish (etf::grid_sum_last, a
// fixed-order sum of the blocks' float64 partial sums of squares), norm[0] = ||E_new||_F
// (float32), with status[2] <- 1 when it is not a positive finite number (degenerate means).
// partials: gridDim.x doubles; ticket: 0 between launches.
extern "C" __global__ void moving_update_norm_f32(const float* e, const float* centred, const float* mu, const int* source, int d, int k, const double* w, float* e_new, double* partials, int* ticket, float* norm, int* status) {
    __shared__ double scratch[33];
    const float a = (float)w[0], b = (float)w[1];
    const long long len = (long long)d * k;
    const long long stride = (long long)gridDim.x * blockDim.x;
    double ss = 0.0;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < len; idx += stride) {
        int j = (int)(idx / k), c = (int)(idx % k);
        float v;
        switch (source[c]) {
            case 0: v = a * centred[idx] + b * e[idx]; break;
            case 1: v = a * mu[j] + b * e[idx]; break;
            case 2: v = mu[j]; break;
            default: v = e[idx]; break;
        }
        e_new[idx] = v;
        ss += (double)v * (double)v;
    }
    ss = etf::block_sum(ss, scratch);
    double total = 0.0;
    if (etf::grid_sum_last(ss, partials, ticket, &total) && threadIdx.x == 0) {
        const float nv = (float)sqrt(total);
        norm[0] = nv;
        if ((!(nv > 0.0f) || !isfinite(nv)) && status[2] == 0) status[2] = 1;
    }
}

// The backward of the Frobenius normalisation, of the moving-mean update and of the batch
// mean, one row group per feature j (etf::RowGroups: a warp on a GPU: dY's and Y's rows read coalesced; the row sums
// by fixed-order warp sums in float64):
//   dE_jc = (dY_jc - Y_jc <Y, dY>) / ||E_new||                 (dot[0] = <Y, dY>)
//   dct[c][j] = a dE_jc for a present class (source 0), else 0  (K x d: coalesced rows for
//                                                               rows_backward_f32)
//   d_mu_j = d_mu_in_j + sum_c (a dE_jc if source 1, dE_jc if source 2)
//   gm_j = (d_mu_j - sum_{c present} dct[c][j]) / n             (the global mean's share)
// n: opt_n[0] when given (a data-parallel step's rows over every rank, collective.cu), else
// the scalar n.
extern "C" __global__ void moving_backward_f32(const float* dy, const float* y, const float* norm, const double* dot, const int* source, const int* counts, const double* w, const float* d_mu_in, int n, const int* opt_n, int d, int k, float* dct, float* gm, int lanes) {
    const float a = (float)w[0], dt = (float)dot[0], nv = norm[0];
    if (opt_n) n = opt_n[0];
    const etf::RowGroups wr(lanes);
    for (int j = wr.first; j < d; j += wr.stride) {
        double mu = 0.0, present = 0.0;
        for (int c = wr.lane; c < k; c += wr.lanes) {
            const size_t idx = (size_t)j * k + c;
            const float de = (dy[idx] - y[idx] * dt) / nv;
            const int s = source[c];
            const float dc = s == 0 ? a * de : 0.0f;
            dct[(size_t)c * d + j] = dc;
            if (s == 1) mu += (double)(a * de);
            else if (s == 2) mu += (double)de;
            if (counts[c] > 0) present += (double)dc;
        }
        mu = wr.sum(mu);
        present = wr.sum(present);
        if (wr.lane == 0) gm[j] = (float)(((double)d_mu_in[j] + mu - present) / (double)n);
    }
}

// Commit of a whole step, grid-stride over max(d K, K K, K): unless the step's status records a
// forward error, E <- E_new, seen <- seen_new, scal <- [t + 1, alpha_new] (as
// moving_commit_f32), Prox <- P and the warm-start eigenvectors q_warm <- Q; prox_used always
// receives the Prox the step solved with (for its report), read before it is replaced.
extern "C" __global__ void commit_step_f32(float* e, int* seen, double* scal, const float* e_new, const int* seen_new, const double* w, int d, int k, double* prox, const double* p, double* prox_used, double* q_warm, const double* q, const int* status) {
    const bool ok = etf::forward_ok(status);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long dk = (long long)d * k, kk = (long long)k * k;
    for (long long i = first; i < dk; i += stride) {
        const double old = prox[i];
        prox_used[i] = old;
        if (ok) {
            prox[i] = p[i];
            e[i] = e_new[i];
        }
    }
    if (!ok) return;
    for (long long i = first; i < kk; i += stride) q_warm[i] = q[i];
    for (long long c = first; c < k; c += stride) seen[c] = seen_new[c];
    if (first == 0) {
        scal[0] = fmin(w[3] + 1.0, 9007199254740992.0);  // saturates at 2^53 (MAX_STEP)
        scal[1] = w[2];
    }
}
