#include "thread_pool.h"

#include <sched.h>
#include <algorithm>
#include <unistd.h>

namespace tidal {

int usable_cores() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}

ThreadPool& ThreadPool::instance() {
    // Leaked on purpose: joining at interpreter exit could deadlock, and a forked child gets a new pool
    // because the parent's workers do not exist there.
    static ThreadPool* pool = nullptr;
    static pid_t owner = 0;
    static std::mutex guard;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != getpid()) {
        pool = new ThreadPool(usable_cores() - 1);
        owner = getpid();
    }
    return *pool;
}

ThreadPool::ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
    for (auto& t : threads_) t.detach();
}

void ThreadPool::drain() {
    for (int i = next_.fetch_add(1); i < tasks_; i = next_.fetch_add(1)) (*job_)(i);
}

void ThreadPool::work() {
    unsigned seen = 0;
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (slots_ == 0) continue;  // enough workers took this run
            --slots_;
        }
        drain();
        std::lock_guard<std::mutex> lock(mutex_);
        if (--active_ == 0) done_.notify_one();
    }
}

void ThreadPool::run(int tasks, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (tasks <= 1 || threads_.empty() || !busy.owns_lock()) {
        for (int i = 0; i < tasks; ++i) fn(i);
        return;
    }
    const int enlist = std::min(static_cast<int>(threads_.size()), tasks - 1);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = &fn;
        tasks_ = tasks;
        next_.store(0);
        active_ = slots_ = enlist;
        ++generation_;
    }
    for (int i = 0; i < enlist; ++i) wake_.notify_one();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return active_ == 0; });
}

}  // namespace tidal
