// Moving class means (method.md §2 step 3) and their backward.
//
// The per-class column source is decided on the device by `moving_plan`:
//   0 UPDATE    E_new = a * c_k + b * E_k     (class present)
//   1 UPDATE_MU E_new = a * mu  + b * E_k     (Reference policy, step 0, class absent)
//   2 SET_MU    E_new = mu, with gradient     (Reference policy, later, absent and unseen)
//   3 HOLD      E_new = E_k, no gradient      (Hold policy absent; Reference absent and seen)
// (a, b) = (alpha, 1 - alpha) for the exponential average, (1/(t+1), t/(t+1)) cumulative;
// the host computes them (they depend on the step count only).
#include "etf_cuda.h"

// One block (any size <= 1024, a multiple of 32). policy: 0 = Hold, 1 = Reference.
// seen: K ints (0/1), updated in place: seen |= present (Hold: always; Reference: only on
// batches in which some class is absent, the reference's quirk).
extern "C" __global__ void moving_plan(const int* counts, int k, int step, int policy, int* seen, int* source) {
    int absent = 0;
    for (int c = threadIdx.x; c < k; c += blockDim.x) absent |= counts[c] == 0;
    int any_absent = __syncthreads_or(absent);
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        bool present = counts[c] > 0;
        int s;
        if (present) s = 0;
        else if (policy == 0) s = 3;
        else if (step == 0) s = 1;
        else if (!seen[c]) s = 2;
        else s = 3;
        source[c] = s;
        if ((policy == 0 || any_absent) && present) seen[c] = 1;
    }
}

// Elementwise over the d x K matrix.
extern "C" __global__ void moving_update(const float* e, const float* centred, const float* mu, const int* source, int d, int k, float a, float b, float* e_new) {
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
extern "C" __global__ void moving_update_backward(const float* d_e_new, const int* source, int d, int k, float a, int accumulate, float* d_centred, float* d_mu) {
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
