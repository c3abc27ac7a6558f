// CPU kernel of sam_fast::parallel_threads (schema in csrc/ops.cpp): runs one at::parallel_for over `tasks`
// tasks, each a short wait, and counts the distinct threads that took a share. ATen's parallel_for is a header
// template whose OpenMP region is compiled into this extension, so the count shows whether the extension's own
// CPU ops spread over torch.get_num_threads() threads (setup.py's -fopenmp) or run on one.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <mutex>
#include <set>
#include <thread>

namespace sam_fast {

int64_t parallel_threads(int64_t tasks) {
  TORCH_CHECK(tasks >= 1 && tasks <= 4096, "parallel_threads: tasks must be in [1, 4096], got ", tasks);
  std::mutex mu;
  std::set<std::thread::id> seen;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    {
      std::lock_guard<std::mutex> lock(mu);
      seen.insert(std::this_thread::get_id());
    }
    // each share takes a moment, so that no thread finishes before the others have started theirs
    std::this_thread::sleep_for(std::chrono::milliseconds(2 * (end - begin)));
  });
  return static_cast<int64_t>(seen.size());
}

TORCH_LIBRARY_IMPL(sam_fast, CompositeExplicitAutograd, m) { m.impl("parallel_threads", &parallel_threads); }

}  // namespace sam_fast
