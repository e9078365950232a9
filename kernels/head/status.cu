// Device-side validation and the step status word (src/gpu/status.rs).
//
// A step records its data-dependent errors in an `int` status buffer on the device instead of
// stopping on the host, so forward and backward need no host synchronisation; the state
// commit kernels read it and leave the state untouched when it records an error.
//   [0] first out-of-range label index        (INT_MAX: none)
//   [1] first non-finite feature index         (INT_MAX: none)
//   [2] moving means degenerate (||E|| = 0)    (0/1; 2: a replayed step of a head imported
//                                               without a Prox, set by step_begin_* in stats.cu;
//                                               -r: the forward failed on r other ranks of a
//                                               data-parallel step, collective.cu)
//   [3] numerical failure in the ETF solve     (0 none, 1 G rank deficient, 2 eigensolver did
//                                               not converge, 3 singular Lagrangian Hessian)
//   [4] first non-finite d_logits index        (INT_MAX: none; written by the backward)
//   [5] numerical failure in the backward      (0/3; -r: the backward failed on r other ranks,
//                                               collective.cu)
//   [6] [7] the label at index [0], as a 64-bit value (low, high 32 bits; valid only when
//           [0] records an index; written by step_begin_* in stats.cu)
#include "etf_cuda.h"

#define ETF_NONE 2147483647

// which = 0: the forward entries [0..4); which = 1: the backward entries [4..6).
extern "C" __global__ void status_reset_i32(int* status, int which) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (which == 0) {
        status[0] = ETF_NONE;
        status[1] = ETF_NONE;
        status[2] = 0;
        status[3] = 0;
    } else {
        status[4] = ETF_NONE;
        status[5] = 0;
    }
}
