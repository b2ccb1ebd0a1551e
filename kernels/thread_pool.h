// A small persistent pool: workers sleep on a condition variable between GEMMs (no spinning, so they
// never steal cores from the server or from ONNX Runtime's own threads in the same process).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tidal {

class ThreadPool {
  public:
    // One process-wide pool with a worker per usable core minus the caller; rebuilt after fork().
    static ThreadPool& instance();

    // Runs fn(i) for every i in [0, tasks); the caller takes part. While another caller holds the pool
    // the tasks run inline instead of queueing, so concurrent model instances never wait on each other.
    void run(int tasks, const std::function<void(int)>& fn);
    int workers() const { return static_cast<int>(threads_.size()); }

    explicit ThreadPool(int workers);
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

  private:
    void work();
    void drain();

    std::vector<std::thread> threads_;
    std::mutex busy_;  // held by the caller for a whole run()
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    const std::function<void(int)>* job_ = nullptr;
    int tasks_ = 0;
    std::atomic<int> next_{0};
    int slots_ = 0;   // workers still to enlist in the current run
    int active_ = 0;  // enlisted workers not yet finished
    unsigned generation_ = 0;
};

// Cores this process may run on (the affinity mask, not the host's count).
int usable_cores();

}  // namespace tidal
