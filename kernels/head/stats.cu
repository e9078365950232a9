// Batch statistics (docs/head.md#batch-class-statistics) and their backward.
//
// Layouts: features N x d row-major; labels N (validated into int32 first); class sums
// K x d row-major (internal); centred means d x K row-major; mu length d.
// Every reduction runs in a fixed order (no float atomics): results are bitwise
// reproducible run to run, on the GPU and on the CPU execution alike.
#include "etf_cuda.h"

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

// ---- the step's bookkeeping in one block ---------------------------------------------------
// Everything a forward decides from the labels and the state scalars, fused into one launch of
// one block (blockDim.x a multiple of 32, at most 1024), in order:
//   1. the status word's forward and backward entries reset (layout in status.cu), and
//      status[2] <- 2 when opt_armed is given and holds 0 (a head imported without a Prox after a step was captured: its next step is a first step, which a replayed graph cannot run);
//   2. labels validated and converted to int32 (`lab`; an out-of-range label becomes 0, the
//      first offending index goes to status[0] and its value to status[6..8]);
//   3. class counts, offsets (exclusive prefix sum, offsets[k] = n) and members (the samples
//      of class c at members[offsets[c] ..offsets[c+1]], in increasing order);
//   4. the moving-mean weights w = [a, b, alpha_new, t] (moving.cu) and the per-class plan
//      (`source`, `seen_new`; the rules in moving.cu).
// Integer atomics only (their results do not depend on the order): deterministic.
// `source` doubles as the members' per-class cursor before the plan overwrites it.
template <typename L>
__device__ __forceinline__ void step_begin(const L* labels, int n, int k, const int* opt_armed, const double* scal, int cumulative, double alpha_floor, int policy, const int* seen, int* status, int* lab, int* counts, int* offsets, int* members, double* w, int* seen_new, int* source) {
    __shared__ int s_bad;
    __shared__ int s_tile[1024];
    __shared__ int s_part[1024];
    const int tid = threadIdx.x, nt = blockDim.x;
    if (tid == 0) {
        s_bad = 2147483647;
        status[0] = 2147483647;
        status[1] = 2147483647;
        status[2] = (opt_armed && opt_armed[0] == 0) ? 2 : 0;
        status[3] = 0;
        status[4] = 2147483647;
        status[5] = 0;
        double t = scal[0], alpha = scal[1], a;
        if (cumulative) a = 1.0 / (t + 1.0);
        else a = alpha > alpha_floor ? 2.0 / (t + 2.0) : alpha_floor;
        w[0] = a;
        w[1] = 1.0 - a;
        w[2] = a;
        w[3] = t;
    }
    for (int c = tid; c < k; c += nt) counts[c] = 0;
    __syncthreads();
    // 2. Labels.
    for (int i = tid; i < n; i += nt) {
        L y = labels[i];
        bool ok = (long long)y >= 0 && (long long)y < (long long)k;
        lab[i] = ok ? (int)y : 0;
        if (!ok) atomicMin(&s_bad, i);
        atomicAdd(&counts[ok ? (int)y : 0], 1);
    }
    __syncthreads();
    if (tid == 0 && s_bad < n) {
        status[0] = s_bad;
        long long v = (long long)labels[s_bad];
        status[6] = (int)(unsigned int)((unsigned long long)v & 0xffffffffull);
        status[7] = (int)(unsigned int)((unsigned long long)v >> 32);
    }
    // 3. Offsets: each thread sums a contiguous chunk of classes, the chunk totals are scanned
    // by thread 0 (nt values), then every chunk is written.
    const int chunk = (k + nt - 1) / nt;
    const int c0 = tid * chunk, c1 = min(k, c0 + chunk);
    int part = 0;
    for (int c = c0; c < c1; c++) part += counts[c];
    s_part[tid] = part;
    __syncthreads();
    if (tid == 0) {
        int acc = 0;
        for (int t = 0; t < nt; t++) {
            int v = s_part[t];
            s_part[t] = acc;
            acc += v;
        }
        offsets[k] = acc;
    }
    __syncthreads();
    int run = s_part[tid];
    for (int c = c0; c < c1; c++) {
        offsets[c] = run;
        source[c] = run;  // the members' cursor of class c
        run += counts[c];
    }
    __syncthreads();
    // Members, stable: tiles of nt samples; a sample's place is its class cursor plus the number
    // of earlier samples of its class in the tile.
    for (int base = 0; base < n; base += nt) {
        const int i = base + tid;
        const int c = i < n ? lab[i] : -1;
        s_tile[tid] = c;
        __syncthreads();
        if (i < n) {
            int rank = 0;
            for (int t = 0; t < tid; t++) rank += s_tile[t] == c;
            members[source[c] + rank] = i;
        }
        __syncthreads();
        if (i < n) atomicAdd(&source[c], 1);
        __syncthreads();
    }
    // 4. The moving-mean plan (overwrites the cursors).
    const bool first = scal[0] == 0.0;
    int absent = 0;
    for (int c = tid; c < k; c += nt) absent |= counts[c] == 0;
    const int any_absent = __syncthreads_or(absent);
    for (int c = tid; c < k; c += nt) etf::moving_plan(counts[c] > 0, policy, first, seen[c], any_absent, &source[c], &seen_new[c]);
}
extern "C" __global__ void __launch_bounds__(1024) step_begin_u32(const unsigned int* labels, int n, int k, const int* opt_armed, const double* scal, int cumulative, double alpha_floor, int policy, const int* seen, int* status, int* lab, int* counts, int* offsets, int* members, double* w, int* seen_new, int* source) {
    step_begin(labels, n, k, opt_armed, scal, cumulative, alpha_floor, policy, seen, status, lab, counts, offsets, members, w, seen_new, source);
}
extern "C" __global__ void __launch_bounds__(1024) step_begin_i64(const long long* labels, int n, int k, const int* opt_armed, const double* scal, int cumulative, double alpha_floor, int policy, const int* seen, int* status, int* lab, int* counts, int* offsets, int* members, double* w, int* seen_new, int* source) {
    step_begin(labels, n, k, opt_armed, scal, cumulative, alpha_floor, policy, seen, status, lab, counts, offsets, members, w, seen_new, source);
}
