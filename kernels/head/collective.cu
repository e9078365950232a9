// The data-parallel step (src/gpu/collective.rs, docs/data-parallel.md): what each rank packs
// into the buffer its collective sums over the ranks, and what it reads back.
//
// Forward buffer (float32, K d + K + d + 2):
//   [0, K d)            per-class feature sums, K x d (class_sums_* writes them in place)
//   [K d, K d + K)      class counts
//   [K d + K, .. + d)   feature sum (sum over the classes of the class sums, fixed order)
//   [K d + K + d]       rows N
//   [K d + K + d + 1]   1 when this rank's forward failed (status word), else 0
// Backward buffer (float32, K d + K + 1):
//   [0, K d)            dW^T = dZ^T X, K x d (the product writes it in place)
//   [K d, K d + K)      db = 1^T dZ
//   [K d + K]           1 when this rank's backward failed, else 0
// A failed rank contributes zeros (its NaN or garbage must not reach the others) and its
// flag; a rank whose own step succeeded but another's failed records minus the number of
// failed ranks in status[2] (forward) or status[5] (backward), which every commit kernel reads
// as a failure (etf::forward_ok), so that no rank commits.
#include "etf_cuda.h"

#define ETF_NONE 2147483647

__device__ __forceinline__ bool forward_failed(const int* status) {
    return !etf::forward_ok(status);
}

// Grid over the features j (1D, any block size): the feature sums, counts, rows and flag
// into `packed` after its class sums (written by class_sums_*); a failed rank zeroes its part.
extern "C" __global__ void stats_pack_f32(float* packed, const int* counts, int n, int d, int k, const int* status) {
    const bool failed = forward_failed(status);
    const size_t kd = (size_t)k * d;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < d) {
        etf::Kahan acc;
        for (int c = 0; c < k; c++) {
            float* s = packed + (size_t)c * d + j;
            if (failed) *s = 0.0f;
            acc.add(*s);
        }
        packed[kd + k + j] = acc.s;
    }
    if (blockIdx.x == 0) {
        for (int c = threadIdx.x; c < k; c += blockDim.x) packed[kd + c] = failed ? 0.0f : (float)counts[c];
        if (threadIdx.x == 0) {
            packed[kd + k + d] = failed ? 0.0f : (float)n;
            packed[kd + k + d + 1] = failed ? 1.0f : 0.0f;
        }
    }
}

// After the sum over the ranks, grid over the features j (blockDim.x a multiple of 32, at
// most 1024): mu_j = total_j / N, centred[j][c] = sums[c][j] / n_c - mu_j (0 for a class with
// no rows on any rank); block 0 also writes the global counts (int), N (n_total[0]), the
// failed-peer record and the moving-mean plan (`source`, `seen_new`: etf::moving_plan, as
// step_begin_* in stats.cu) from the global counts.
extern "C" __global__ void stats_unpack_f32(const float* packed, int d, int k, const double* scal, int policy, const int* seen, int* status, int* counts, int* n_total, float* mu, float* centred, int* source, int* seen_new) {
    const size_t kd = (size_t)k * d;
    const float nf = packed[kd + k + d];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < d) {
        const float m = nf > 0.0f ? packed[kd + k + j] / nf : 0.0f;
        mu[j] = m;
        for (int c = 0; c < k; c++) {
            const float nc = packed[kd + c];
            centred[(size_t)j * k + c] = nc > 0.0f ? packed[(size_t)c * d + j] / nc - m : 0.0f;
        }
    }
    if (blockIdx.x != 0) return;
    const int tid = threadIdx.x, nt = blockDim.x;
    // Every rank reads the same sums, so the plan below is the same on every rank.
    const bool own = forward_failed(status);
    __syncthreads();
    if (tid == 0) {
        const int failed = (int)(packed[kd + k + d + 1] + 0.5f) - (own ? 1 : 0);
        if (!own && failed > 0) status[2] = -failed;
        n_total[0] = (int)(nf + 0.5f);
    }
    const bool first = scal[0] == 0.0;
    int absent = 0;
    for (int c = tid; c < k; c += nt) {
        const int nc = (int)(packed[kd + c] + 0.5f);
        counts[c] = nc;
        absent |= nc == 0;
    }
    const int any_absent = __syncthreads_or(absent);
    for (int c = tid; c < k; c += nt) etf::moving_plan(packed[kd + c] > 0.5f, policy, first, seen[c], any_absent, &source[c], &seen_new[c]);
}

// Grid-stride over K d (1D): db and the flag into `packed` after its dW^T (written by the
// product); a rank whose backward failed (a non-finite d_logits, status[4]) zeroes its part.
extern "C" __global__ void grads_pack_f32(float* packed, const float* db, int d, int k, const int* status) {
    const bool failed = status[4] != ETF_NONE;
    const long long kd = (long long)k * d;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (failed) {
        for (long long i = first; i < kd; i += stride) packed[i] = 0.0f;
    }
    for (long long c = first; c < k; c += stride) packed[kd + c] = failed ? 0.0f : db[c];
    if (first == 0) packed[kd + k] = failed ? 1.0f : 0.0f;
}

// After the sum over the ranks (one block): db <- the summed db, and the failed-peer record
// in status[5] (minus the number of other ranks whose backward failed).
extern "C" __global__ void grads_unpack_f32(const float* packed, int d, int k, float* db, int* status) {
    const size_t kd = (size_t)k * d;
    for (int c = threadIdx.x; c < k; c += blockDim.x) db[c] = packed[kd + c];
    if (threadIdx.x == 0) {
        const bool own = status[4] != ETF_NONE;
        const int failed = (int)(packed[kd + k] + 0.5f) - (own ? 1 : 0);
        if (!own && failed > 0 && status[5] == 0) status[5] = -failed;
    }
}
