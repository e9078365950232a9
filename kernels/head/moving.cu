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

// Elementwise over the d x K matrix.
extern "C" __global__ void moving_update_f32(const float* e, const float* centred, const float* mu, const int* source, int d, int k, const double* w, float* e_new) {
    const float a = (float)w[0], b = (float)w[1];
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)d * k) return;
    int j = (int)(idx / k), c = (int)(idx % k);
    float v;
    switch (source[c]) {
        case 0: v = a * centred[idx] + b * e[idx]; break;
        case 1: v = a * mu[j] + b * e[idx]; break;
        case 2: v = mu[j]; break;
        default: v = e[idx]; break;
    }
    e_new[idx] = v;
}

// One thread per feature j: d_centred[j][c] = a * g (source 0) else 0;
// d_mu[j] (+)= sum_c (a * g if source 1, g if source 2). accumulate: 0 overwrite, 1 add.
extern "C" __global__ void moving_update_backward_f32(const float* d_e_new, const int* source, int d, int k, const double* w, int accumulate, float* d_centred, float* d_mu) {
    const float a = (float)w[0];
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    etf::Kahan acc;
    for (int c = 0; c < k; c++) {
        size_t idx = (size_t)j * k + c;
        float g = d_e_new[idx];
        int s = source[c];
        d_centred[idx] = s == 0 ? a * g : 0.0f;
        if (s == 1) acc.add(a * g);
        else if (s == 2) acc.add(g);
    }
    d_mu[j] = accumulate ? d_mu[j] + acc.s : acc.s;
}

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
