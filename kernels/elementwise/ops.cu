// Element-wise helpers shared by several stages (grid-stride loops; any launch shape).
#include "etf_cuda.h"

// a += b (len floats).
extern "C" __global__ void add_assign_f32(float* a, const float* b, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += stride) a[e] += b[e];
}

// v <- I (k x k).
extern "C" __global__ void identity_f64(double* v, int k) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)k * k; e += stride)
        v[e] = (e / k == e % k) ? 1.0 : 0.0;
}

// z = a + b (len doubles).
extern "C" __global__ void add_f64(const double* a, const double* b, long long len, double* z) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < len; e += stride) z[e] = a[e] + b[e];
}
