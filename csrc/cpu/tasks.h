// How the kernels share their tasks among the pool's threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "attnext/params.h"

namespace attnext::cpu {
namespace {

// Tasks [0, n) handed out one at a time, in order, to whichever worker asks next: a worker whose core
// runs faster (a core not shared with another thread, a performance core) takes more of them, where
// equal static ranges end with the slowest worker. No result depends on which worker ran a task.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  bool next(int64_t* task) {
    *task = next_.fetch_add(1, std::memory_order_relaxed);
    return *task < n_;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_;
};

// Runs worker(ctx, queue) on up to num_threads threads of the pool: each sets up its scratch once, then
// takes tasks until none is left (a pool that runs the workers one after another still runs every task).
template <class Ctx>
void run_tasks(const FwdParams& p, int64_t n_tasks, Ctx* ctx, void (*worker)(Ctx&, TaskQueue&)) {
  struct Job {
    Ctx* ctx;
    void (*worker)(Ctx&, TaskQueue&);
    TaskQueue queue;
  } job{ctx, worker, TaskQueue(n_tasks)};
  p.parallel_for(std::min<int64_t>(p.num_threads, n_tasks), &job, [](void* j, int64_t, int64_t) {
    Job& job = *static_cast<Job*>(j);
    job.worker(*job.ctx, job.queue);
  });
}

}  // namespace
}  // namespace attnext::cpu
