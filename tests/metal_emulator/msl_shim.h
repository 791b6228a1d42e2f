// The subset of the Metal Shading Language that metal/block_attention.metal uses, emulated in C++20 so the
// kernel compiles with g++ and runs on Linux (tests/test_metal_kernel.py).
//
// Execution model, as in dispatchThreads: threadgroups run one at a time; the threads of a threadgroup are
// real std::threads; lanes 32*s .. 32*s+31 form simdgroup s. simd_sum/simd_max/simd_shuffle exchange values
// through per-simdgroup slots between two simdgroup barriers, simdgroup_barrier/threadgroup_barrier are
// std::barrier waits, and `threadgroup` variables are function statics (shared by the threads of the one
// running threadgroup). half and bfloat are plain float here. A kernel that leaves some lanes out of a
// barrier deadlocks, and the test's timeout reports it.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef float half;
typedef float bfloat;
typedef float float16_t;
typedef float bfloat16_t;

struct uint3 {
  uint x, y, z;
};

namespace metal {

enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };

inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return std::max(a, b); }
inline int min(int a, int b) { return std::min(a, b); }
inline uint max(uint a, uint b) { return std::max(a, b); }
inline uint min(uint a, uint b) { return std::min(a, b); }

}  // namespace metal

namespace msl {

constexpr uint SIMD_WIDTH = 32;

struct SimdGroup {
  explicit SimdGroup(int lanes) : barrier(lanes), slots(lanes) {}
  std::barrier<> barrier;
  std::vector<float> slots;
};

// Everything one emulated thread can ask about itself; field names are the MSL attribute names.
struct Thread {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
  SimdGroup* simd;
  std::barrier<>* group_barrier;
};

inline thread_local Thread* self = nullptr;

// Reduce over the lanes of the calling simdgroup; every lane gets the same result.
template <typename F>
float simd_reduce(float x, F op) {
  SimdGroup& s = *self->simd;
  s.slots[self->thread_index_in_simdgroup] = x;
  s.barrier.arrive_and_wait();
  float r = s.slots[0];
  for (size_t i = 1; i < s.slots.size(); i++) r = op(r, s.slots[i]);
  s.barrier.arrive_and_wait();  // nobody overwrites a slot before all lanes have read
  return r;
}

// Run `kernel(thread)` for every thread of grid (in threads) split into threadgroups of `group` threads.
// As in MLX's CustomKernel::eval_gpu the threadgroup is clipped to the grid; edge groups are partial.
inline void dispatch_threads(uint3 grid, uint3 group, const std::function<void(Thread&)>& kernel) {
  const uint3 tg = {std::min(group.x, grid.x), std::min(group.y, grid.y), std::min(group.z, grid.z)};
  const uint3 groups = {(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  for (uint gz = 0; gz < groups.z; gz++)
    for (uint gy = 0; gy < groups.y; gy++)
      for (uint gx = 0; gx < groups.x; gx++) {
        const uint3 size = {std::min(tg.x, grid.x - gx * tg.x), std::min(tg.y, grid.y - gy * tg.y),
                            std::min(tg.z, grid.z - gz * tg.z)};
        const uint n = size.x * size.y * size.z;
        const uint n_simd = (n + SIMD_WIDTH - 1) / SIMD_WIDTH;
        std::barrier<> group_barrier(n);
        std::vector<std::unique_ptr<SimdGroup>> simds;
        for (uint s = 0; s < n_simd; s++) simds.emplace_back(new SimdGroup(std::min(SIMD_WIDTH, n - s * SIMD_WIDTH)));
        std::vector<Thread> threads(n);
        std::vector<std::thread> workers;
        for (uint i = 0; i < n; i++) {
          const uint3 local = {i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
          Thread& t = threads[i];
          t.thread_position_in_threadgroup = local;
          t.threadgroup_position_in_grid = {gx, gy, gz};
          t.thread_position_in_grid = {gx * tg.x + local.x, gy * tg.y + local.y, gz * tg.z + local.z};
          t.threads_per_threadgroup = size;
          t.threadgroups_per_grid = groups;
          t.threads_per_grid = grid;
          t.grid_size = grid;
          t.thread_index_in_threadgroup = i;
          t.thread_index_in_simdgroup = i % SIMD_WIDTH;
          t.simdgroup_index_in_threadgroup = i / SIMD_WIDTH;
          t.simdgroups_per_threadgroup = n_simd;
          t.threads_per_simdgroup = SIMD_WIDTH;
          t.thread_execution_width = SIMD_WIDTH;
          t.simd = simds[i / SIMD_WIDTH].get();
          t.group_barrier = &group_barrier;
          workers.emplace_back([&kernel, &t] {
            self = &t;
            kernel(t);
          });
        }
        for (auto& w : workers) w.join();
      }
}

}  // namespace msl

namespace metal {

inline float simd_sum(float x) {
  return msl::simd_reduce(x, [](float a, float b) { return a + b; });
}
inline float simd_max(float x) {
  return msl::simd_reduce(x, [](float a, float b) { return std::fmax(a, b); });
}
inline float simd_shuffle(float x, ushort lane) {
  msl::SimdGroup& s = *msl::self->simd;
  s.slots[msl::self->thread_index_in_simdgroup] = x;
  s.barrier.arrive_and_wait();
  const float r = s.slots[lane];
  s.barrier.arrive_and_wait();
  return r;
}
inline void simdgroup_barrier(mem_flags) { msl::self->simd->barrier.arrive_and_wait(); }
inline void threadgroup_barrier(mem_flags) { msl::self->group_barrier->arrive_and_wait(); }

}  // namespace metal

using namespace metal;

// MSL address spaces: nothing to do on a CPU, except that threadgroup memory is shared by the threadgroup's
// threads (defined last: the shim itself uses std::thread).
#define device
#define constant
#define thread
#define threadgroup static
