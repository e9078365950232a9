// Batch statistics (docs/head.md#batch-class-statistics) and their backward.
//
// Layouts: features N x d row-major; labels N (validated into int32 first); class sums
// K x d row-major (internal); centred means d x K row-major; mu length d.
// Every reduction runs in a fixed order (no float atomics): results are bitwise
// reproducible run to run, on the GPU and on the CPU execution alike.
#include "etf_cuda.h"

// ---- labels: validate and widen/narrow to int32 ------------------------------------------
// `bad` must hold n before the launch; it ends as the smallest index of an out-of-range label.
template <typename L>
__device__ __forceinline__ void labels_to_i32(const L* labels, int n, int k, int* out, int* bad) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    L y = labels[i];
    bool ok = (long long)y >= 0 && (long long)y < (long long)k;
    out[i] = ok ? (int)y : 0;
    if (!ok) atomicMin(bad, i);
}
extern "C" __global__ void labels_to_i32_u32(const unsigned int* labels, int n, int k, int* out, int* bad) {
    labels_to_i32(labels, n, k, out, bad);
}
extern "C" __global__ void labels_to_i32_i64(const long long* labels, int n, int k, int* out, int* bad) {
    labels_to_i32(labels, n, k, out, bad);
}

// After labels_to_i32_*: when status[0] holds the index of an out-of-range label, copy that
// label's value into status[6] (low 32 bits) and status[7] (high 32 bits), so the host can
// report it from the status word alone (the step status layout is in status.cu). One thread.
template <typename L>
__device__ __forceinline__ void record_bad_label(const L* labels, int n, int* status) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int i = status[0];
    if (i < 0 || i >= n) return;  // none recorded (INT_MAX)
    long long v = (long long)labels[i];
    status[6] = (int)(unsigned int)((unsigned long long)v & 0xffffffffull);
    status[7] = (int)(unsigned int)((unsigned long long)v >> 32);
}
extern "C" __global__ void record_bad_label_u32(const unsigned int* labels, int n, int* status) {
    record_bad_label(labels, n, status);
}
extern "C" __global__ void record_bad_label_i64(const long long* labels, int n, int* status) {
    record_bad_label(labels, n, status);
}

// ---- class membership: counts, offsets, members (stable order) ---------------------------
// One thread per class scans the labels: O(N K) label reads, deterministic, no atomics.
extern "C" __global__ void class_counts_i32(const int* labels, int n, int k, int* counts) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k) return;
    int m = 0;
    for (int i = 0; i < n; i++) m += labels[i] == c;
    counts[c] = m;
}

// Exclusive prefix sum of counts into offsets[0..=k]; launch with one block of 1 thread.
extern "C" __global__ void class_offsets_i32(const int* counts, int k, int* offsets) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int s = 0;
    for (int c = 0; c < k; c++) {
        offsets[c] = s;
        s += counts[c];
    }
    offsets[k] = s;
}

// members[offsets[c] ..offsets[c+1]] = the samples of class c, in increasing order.
extern "C" __global__ void class_members_i32(const int* labels, int n, int k, const int* offsets, int* members) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k) return;
    int p = offsets[c];
    for (int i = 0; i < n; i++)
        if (labels[i] == c) members[p++] = i;
}

// ---- class sums: grid (ceil(d / blockDim.x), K); sums K x d -------------------------------
template <typename F>
__device__ __forceinline__ void class_sums(const F* x, int d, const int* offsets, const int* members, float* sums) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int c = blockIdx.y;
    if (j >= d) return;
    etf::Kahan acc;
    for (int p = offsets[c]; p < offsets[c + 1]; p++) acc.add(etf::to_f32(x[(size_t)members[p] * d + j]));
    sums[(size_t)c * d + j] = acc.s;
}
extern "C" __global__ void class_sums_f32(const float* x, int d, const int* offsets, const int* members, float* sums) {
    class_sums(x, d, offsets, members, sums);
}
extern "C" __global__ void class_sums_f16(const __half* x, int d, const int* offsets, const int* members, float* sums) {
    class_sums(x, d, offsets, members, sums);
}
extern "C" __global__ void class_sums_bf16(const __nv_bfloat16* x, int d, const int* offsets, const int* members, float* sums) {
    class_sums(x, d, offsets, members, sums);
}

// ---- global mean and centred class means: one thread per feature j ------------------------
// mu_j = (sum_c sums[c][j]) / n; centred[j][c] = sums[c][j] / counts[c] - mu_j, 0 if absent.
extern "C" __global__ void class_means_f32(const float* sums, const int* counts, int n, int d, int k, float* mu, float* centred) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    etf::Kahan acc;
    for (int c = 0; c < k; c++) acc.add(sums[(size_t)c * d + j]);
    float m = acc.s / (float)n;
    mu[j] = m;
    for (int c = 0; c < k; c++) {
        int nc = counts[c];
        centred[(size_t)j * k + c] = nc > 0 ? sums[(size_t)c * d + j] / (float)nc - m : 0.0f;
    }
}

// ---- backward ----------------------------------------------------------------------------
// g_j = (d_mu_j - sum_{c present} d_centred[j][c]) / n; one thread per feature j.
extern "C" __global__ void class_stats_backward_prep_f32(const float* d_centred, const float* d_mu, const int* counts, int n, int d, int k, float* g) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    etf::Kahan acc;
    for (int c = 0; c < k; c++)
        if (counts[c] > 0) acc.add(d_centred[(size_t)j * k + c]);
    g[j] = (d_mu[j] - acc.s) / (float)n;
}

// dx[i][j] = d_centred[j][y_i] / n_{y_i} + g_j; grid (ceil(d / blockDim.x), N).
extern "C" __global__ void class_stats_backward_scatter_f32(const int* labels, const int* counts, const float* d_centred, const float* g, int d, int k, float* dx) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int i = blockIdx.y;
    if (j >= d) return;
    int y = labels[i];
    dx[(size_t)i * d + j] = d_centred[(size_t)j * k + y] / (float)counts[y] + g[j];
}
