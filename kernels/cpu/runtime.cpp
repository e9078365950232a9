// Runtime of the CPU execution model (see cuda_cpu.h and kernels/README.md).
//
// - One process-wide launch mutex: launches never overlap.
// - A persistent pool of host threads (grown on demand, at most 1024); thread `i` of the pool
//   runs linear thread `i` of every block. Blocks of a grid run one after another.
// - Block barrier and per-warp barriers with deadlock detection: when every live thread of the
//   block waits at some barrier and none can complete (a thread has exited, lanes wait at
//   different barriers, a shuffle names an absent lane), the launch fails with a message.
#include "cuda_cpu.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <semaphore>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace etf_cpu {
thread_local uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;
}  // namespace etf_cpu

namespace etf_cpu {
namespace {

struct Abort {};

struct Warp {
    std::condition_variable cv;
    unsigned existing = 0;   // lanes that exist in this warp (a partial last warp has fewer)
    unsigned arrived = 0;    // lanes waiting at the current warp barrier
    unsigned arrived_mask = 0;
    unsigned mask = 0;       // mask of the current warp barrier
    unsigned long gen = 0;
    unsigned long long slots[32];
    unsigned long long results[32];
};

struct Block {
    std::mutex m;
    std::condition_variable cv;
    unsigned nthreads = 0;
    unsigned exited = 0;
    unsigned blocked = 0;          // threads waiting at any barrier
    unsigned arrived = 0;          // at the block barrier
    unsigned long gen = 0;
    const char* site = nullptr;    // site of the pending block barrier
    int count_acc = 0, count_result = 0;
    bool aborted = false;
    std::string error;
    std::vector<Warp> warps;
    void* dyn_shared = nullptr;
};

Block* g_block = nullptr;

void fail_locked(Block& b, const std::string& msg) {
    if (!b.aborted) {
        b.aborted = true;
        b.error = msg;
    }
    b.cv.notify_all();
    for (auto& w : b.warps) w.cv.notify_all();
}

unsigned linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

std::string where() {
    char buf[160];
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y,
                  blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    return buf;
}

// Called with the lock held after a thread starts waiting or exits.
void check_deadlock_locked(Block& b) {
    if (b.blocked > 0 && b.blocked == b.nthreads - b.exited) {
        char buf[256];
        std::snprintf(buf, sizeof buf,
                      "deadlock: %u thread(s) wait at barriers (block barrier: %u at %s) while "
                      "%u thread(s) of the block have exited or wait elsewhere; a GPU would hang "
                      "or misbehave (barrier not reached by every thread of the block/warp)",
                      b.blocked, b.arrived, b.site ? b.site : "-", b.exited);
        fail_locked(b, std::string(buf) + " [" + where() + "]");
    }
}

// ---- thread pool -------------------------------------------------------------------------
// One semaphore per worker, so a block of n threads wakes exactly n workers.
struct Worker {
    std::binary_semaphore go{0};
};
struct Pool {
    unsigned job_threads = 0;
    const std::function<void()>* job = nullptr;
    std::atomic<unsigned> done{0};
    std::binary_semaphore all_done{0};
    std::vector<std::unique_ptr<Worker>> workers;
};
// Leaked on purpose: the detached workers block on their semaphores for the life of the
// process, so the pool must never be destroyed by static destruction at exit (a destroyed
// semaphore under a waiting thread crashes the process after the tests have passed).
Pool& g_pool = *new Pool();

void run_one_thread(unsigned i) {
    Block& b = *g_block;
    threadIdx.x = i % blockDim.x;
    threadIdx.y = (i / blockDim.x) % blockDim.y;
    threadIdx.z = i / (blockDim.x * blockDim.y);
    try {
        (*g_pool.job)();
    } catch (const Abort&) {
    } catch (...) {
        std::lock_guard<std::mutex> lk(b.m);
        fail_locked(b, "a kernel thread threw a C++ exception [" + where() + "]");
    }
    std::lock_guard<std::mutex> lk(b.m);
    b.exited++;
    check_deadlock_locked(b);
}

void* worker_main(void* arg) {
    unsigned i = (unsigned)(uintptr_t)arg;
    Worker* w = g_pool.workers[i].get();
    for (;;) {
        w->go.acquire();
        run_one_thread(i);
        if (g_pool.done.fetch_add(1) + 1 == g_pool.job_threads) g_pool.all_done.release();
    }
    return nullptr;
}

std::string grow_pool(unsigned n) {
    if (g_pool.workers.empty()) g_pool.workers.reserve(1024);
    while (g_pool.workers.size() < n) {
        g_pool.workers.push_back(std::make_unique<Worker>());
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1u << 20);
        pthread_t t;
        int rc = pthread_create(&t, &attr, worker_main, (void*)(uintptr_t)(g_pool.workers.size() - 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            g_pool.workers.pop_back();
            return "cannot create host thread for the CPU execution";
        }
        pthread_detach(t);
    }
    return "";
}

void run_block(unsigned nthreads, const std::function<void()>& fn) {
    g_pool.job = &fn;
    g_pool.job_threads = nthreads;
    g_pool.done.store(0);
    for (unsigned i = 0; i < nthreads; i++) g_pool.workers[i]->go.release();
    g_pool.all_done.acquire();
}

std::mutex g_launch_mutex;
// MAX_DYNAMIC_SHARED_BYTES of src/runtime/mod.rs (Hopper's opt-in maximum per block).
size_t g_max_dynamic_shared = 227 * 1024;

}  // namespace

// ---- barrier primitives used by cuda_cpu.h ------------------------------------------------
int syncthreads_count(int pred, const char* site) {
    Block& b = *g_block;
    std::unique_lock<std::mutex> lk(b.m);
    if (b.aborted) throw Abort{};
    if (b.arrived == 0) {
        b.site = site;
        b.count_acc = 0;
    } else if (std::strcmp(b.site, site) != 0) {
        fail_locked(b, std::string("divergent __syncthreads: threads wait at ") + b.site +
                           " and at " + site + " [" + where() + "]");
        throw Abort{};
    }
    b.count_acc += pred;
    if (++b.arrived == b.nthreads) {
        b.blocked -= b.nthreads - 1;  // the waiters are released now
        b.count_result = b.count_acc;
        b.arrived = 0;
        b.site = nullptr;
        b.gen++;
        b.cv.notify_all();
        return b.count_result;
    }
    unsigned long my = b.gen;
    b.blocked++;
    check_deadlock_locked(b);
    b.cv.wait(lk, [&] { return b.gen != my || b.aborted; });
    if (b.gen == my) throw Abort{};
    return b.count_result;
}

void syncthreads(const char* site) { (void)syncthreads_count(0, site); }

namespace {
unsigned long long pick(const Warp& w, unsigned need, unsigned lane, int read_lane,
                        unsigned long long mine) {
    if (read_lane < 0) return w.results[lane];
    if (read_lane < 32 && (need >> read_lane) & 1u) return w.results[read_lane];
    return mine;
}

// One warp-synchronous step: every lane of `mask` deposits `mine`; `finish` computes the
// per-lane results once all have arrived. Returns this lane's result.
// `read_lane`: which lane's result this lane takes (-1: its own); an absent or out-of-mask
// lane yields `mine` (shuffles from inactive lanes are undefined on the GPU). The result is
// read under the lock before returning; the next warp step cannot complete (and overwrite
// `results`) before this lane arrives there, so one barrier per step is enough.
template <typename F>
unsigned long long warp_step(unsigned mask, unsigned long long mine, const char* what,
                             const char* site, F finish, int read_lane = -1) {
    Block& b = *g_block;
    unsigned lin = linear_tid();
    unsigned lane = lin & 31u;
    Warp& w = b.warps[lin >> 5];
    std::unique_lock<std::mutex> lk(b.m);
    if (b.aborted) throw Abort{};
    if (!(mask & (1u << lane))) {
        fail_locked(b, std::string(what) + " called by a lane outside its mask at " + site +
                           " [" + where() + "]");
        throw Abort{};
    }
    unsigned need = mask & w.existing;
    if (w.arrived == 0) {
        w.mask = mask;
        w.arrived_mask = 0;
    } else if (w.mask != mask) {
        fail_locked(b, std::string(what) + ": lanes of one warp use different masks at " +
                           site + " [" + where() + "]");
        throw Abort{};
    }
    w.slots[lane] = mine;
    w.arrived_mask |= 1u << lane;
    if (++w.arrived == (unsigned)__builtin_popcount(need)) {
        b.blocked -= w.arrived - 1;  // the waiting lanes are released now
        finish(w, need);
        w.arrived = 0;
        w.gen++;
        w.cv.notify_all();
        return pick(w, need, lane, read_lane, mine);
    }
    unsigned long my = w.gen;
    b.blocked++;
    check_deadlock_locked(b);
    w.cv.wait(lk, [&] { return w.gen != my || b.aborted; });
    if (w.gen == my) throw Abort{};
    return pick(w, mask & w.existing, lane, read_lane, mine);
}
}  // namespace

void syncwarp(unsigned mask, const char* site) {
    (void)warp_step(mask, 0, "__syncwarp", site, [](Warp&, unsigned) {});
}

unsigned long long warp_exchange(unsigned mask, unsigned long long mine, int src_lane,
                                 const char* site) {
    return warp_step(
        mask, mine, "__shfl_sync", site,
        [](Warp& w, unsigned) {
            for (int l = 0; l < 32; l++) w.results[l] = w.slots[l];
        },
        src_lane < 0 ? 32 : src_lane);
}

unsigned warp_ballot(unsigned mask, int pred, const char* site) {
    unsigned long long r = warp_step(mask, (unsigned long long)(pred != 0), "__ballot_sync", site,
                                     [](Warp& w, unsigned need) {
                                         unsigned bal = 0;
                                         for (int l = 0; l < 32; l++)
                                             if ((need >> l) & 1u && w.slots[l]) bal |= 1u << l;
                                         for (int l = 0; l < 32; l++) w.results[l] = bal;
                                     });
    return (unsigned)r;
}

void* dynamic_shared() { return g_block->dyn_shared; }

void trap(const char* what) {
    Block& b = *g_block;
    std::lock_guard<std::mutex> lk(b.m);
    fail_locked(b, std::string(what) + " [" + where() + "]");
    throw Abort{};
}

// Runs `fn` as a kernel over the grid. Returns "" or the error message.
std::string run_grid(dim3 grid, dim3 block, size_t shmem, const std::function<void()>& fn) {
    std::lock_guard<std::mutex> launch(g_launch_mutex);
    char buf[256];
    unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
        std::snprintf(buf, sizeof buf, "zero-sized grid (%u,%u,%u)", grid.x, grid.y, grid.z);
        return buf;
    }
    if (block.x == 0 || block.y == 0 || block.z == 0) {
        std::snprintf(buf, sizeof buf, "zero-sized block (%u,%u,%u)", block.x, block.y, block.z);
        return buf;
    }
    if (nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
        std::snprintf(buf, sizeof buf,
                      "block (%u,%u,%u) exceeds the limits (1024 threads, z <= 64)", block.x,
                      block.y, block.z);
        return buf;
    }
    if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
        std::snprintf(buf, sizeof buf, "grid (%u,%u,%u) exceeds the limits", grid.x, grid.y,
                      grid.z);
        return buf;
    }
    if (shmem > g_max_dynamic_shared) {
        std::snprintf(buf, sizeof buf,
                      "dynamic shared memory %zu bytes exceeds the limit of %zu bytes", shmem,
                      g_max_dynamic_shared);
        return buf;
    }
    std::string e = grow_pool((unsigned)nthreads);
    if (!e.empty()) return e;
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                Block b;
                b.nthreads = (unsigned)nthreads;
                b.warps = std::vector<Warp>((nthreads + 31) / 32);
                for (size_t wi = 0; wi < b.warps.size(); wi++) {
                    unsigned lanes = (unsigned)std::min<unsigned long long>(32, nthreads - wi * 32);
                    b.warps[wi].existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
                }
                // Fresh, poisoned dynamic shared memory per block (exact size, so the address
                // sanitizer sees overruns).
                b.dyn_shared = std::malloc(shmem);
                if (shmem) std::memset(b.dyn_shared, 0xff, shmem);
                blockIdx.x = x;
                blockIdx.y = y;
                blockIdx.z = z;
                g_block = &b;
                run_block((unsigned)nthreads, fn);
                g_block = nullptr;
                std::free(b.dyn_shared);
                if (b.aborted) {
                    std::snprintf(buf, sizeof buf, " (grid (%u,%u,%u), block (%u,%u,%u))", grid.x,
                                  grid.y, grid.z, block.x, block.y, block.z);
                    return b.error + buf;
                }
            }
    return "";
}

}  // namespace etf_cpu
