// Self-tests of the execution model (CUDA semantics the kernels rely on). The last three
// kernels are deliberately wrong; tests run them only on the CPU execution.
#include "etf_cuda.h"

// out[blockIdx.x] = sum of in[blockIdx.x * blockDim.x ..][..blockDim.x] via etf::block_sum.
extern "C" __global__ void selftest_block_sum_f32(const float* in, float* out) {
    __shared__ float scratch[33];
    float s = etf::block_sum(in[blockIdx.x * blockDim.x + threadIdx.x], scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Per thread t (one block, blockDim.x a multiple of 32): out[5t..5t+5] =
// shfl(v, lane 3), shfl_down(v, 1), shfl_up(v, 2), shfl_xor(v, 5), ballot(v odd).
extern "C" __global__ void selftest_shuffles_i32(const int* in, int* out) {
    int t = threadIdx.x;
    int v = in[t];
    out[5 * t + 0] = __shfl_sync(0xffffffffu, v, 3);
    out[5 * t + 1] = __shfl_down_sync(0xffffffffu, v, 1);
    out[5 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[5 * t + 3] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[5 * t + 4] = (int)__ballot_sync(0xffffffffu, v & 1);
    __syncwarp();
}

// Every thread of every block adds 1 to each counter and offers its global id to max/min.
extern "C" __global__ void selftest_atomics_i32(int* ci, unsigned int* cu, unsigned long long* cull, float* cf, double* cd, int* mx, int* mn) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(ci, 1);
    atomicAdd(cu, 1u);
    atomicAdd(cull, 1ull);
    atomicAdd(cf, 1.0f);
    atomicAdd(cd, 1.0);
    atomicMax(mx, g);
    atomicMin(mn, g);
}

// Reverses each block's chunk through dynamic shared memory (blockDim.x floats).
extern "C" __global__ void selftest_dynamic_shared_f32(const float* in, float* out) {
    extern __shared__ float s[];
    int t = threadIdx.x, n = blockDim.x;
    s[t] = in[blockIdx.x * n + t];
    __syncthreads();
    out[blockIdx.x * n + t] = s[n - 1 - t];
}

// f32 -> f16 / bf16 -> f32 round trips.
extern "C" __global__ void selftest_half_f32(const float* in, int n, __half* h, __nv_bfloat16* b, float* h_back, float* b_back) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    h[i] = __float2half(in[i]);
    b[i] = __float2bfloat16(in[i]);
    h_back[i] = __half2float(h[i]);
    b_back[i] = __bfloat162float(b[i]);
}

// WRONG on purpose: thread 0 leaves while the others wait at the barrier.
extern "C" __global__ void selftest_bad_barrier_exit_i32(int* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// WRONG on purpose: the two halves of the block wait at different barriers.
extern "C" __global__ void selftest_bad_divergent_barrier_i32(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// WRONG on purpose: writes one element past the end (the address sanitizer must catch it).
extern "C" __global__ void selftest_bad_oob_write_f32(float* buf, int n) {
    if (threadIdx.x == 0) buf[n] = 1.0f;
}
