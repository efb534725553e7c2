// The host emulation's execution engine (see runtime.h): a pool of blockDim threads that runs the
// blocks of a grid one after another, with real barriers for __syncthreads and warp shuffles.
#include "cuda_emu/runtime.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <barrier>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

namespace litefpn {
namespace emu {
namespace {

constexpr int kWarp = 32;
constexpr std::size_t kSlotBytes = 16;

// One block in flight: its barriers, shuffle slots and __shared__ storage.
struct Block {
  explicit Block(int threads) : bar(threads), slots(threads) {
    for (int w = 0; w * kWarp < threads; ++w)
      warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(kWarp, threads - w * kWarp)));
  }
  ~Block() {
    for (const Shared& s : shared) ::operator delete(s.ptr, std::align_val_t(s.align));
  }
  struct Shared {
    const void* site;
    void* ptr;
    std::size_t align;
  };
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<std::array<unsigned char, kSlotBytes>> slots;
  std::mutex m;
  std::vector<Shared> shared;
};

thread_local Block* tl_block = nullptr;

struct Job {
  Block* block = nullptr;
  unsigned int b = 0, blocks = 0;
  void (*body)(const void*) = nullptr;
  const void* ctx = nullptr;
};

// blockDim threads, released once per block by `start` and collected by `done`.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads), start_(threads + 1), done_(threads + 1) {
    for (int t = 0; t < threads; ++t) std::thread([this, t] { loop(t); }).detach();
  }
  void run_block(const Job& job) {
    job_ = job;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  void loop(int t) {
    for (;;) {
      start_.arrive_and_wait();
      threadIdx = uint3(static_cast<unsigned int>(t));
      blockIdx = uint3(job_.b);
      blockDim = dim3(static_cast<unsigned int>(threads_));
      gridDim = dim3(job_.blocks);
      tl_block = job_.block;
      job_.body(job_.ctx);
      // an exited thread no longer takes part in the block's barriers
      tl_block->bar.arrive_and_drop();
      tl_block->warp_bars[t / kWarp]->arrive_and_drop();
      tl_block = nullptr;
      done_.arrive_and_wait();
    }
  }
  const int threads_;
  std::barrier<> start_, done_;
  Job job_;
};

std::mutex g_launch_mutex;  // one grid at a time
std::mutex g_log_mutex;
std::vector<std::string> g_log;
std::atomic<bool> g_force_int64{false};

Pool& pool_for(int threads) {
  static std::map<int, Pool*> pools;  // never destroyed: the threads live until the process ends
  Pool*& p = pools[threads];
  if (p == nullptr) p = new Pool(threads);
  return *p;
}

Block& current_block() {
  TORCH_CHECK(tl_block != nullptr, "cuda_emu: a block primitive was called outside a kernel");
  return *tl_block;
}

}  // namespace

bool force_int64() { return g_force_int64.load(); }
void set_force_int64(bool on) { g_force_int64.store(on); }

std::vector<std::string> take_launch_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<std::string> out;
  out.swap(g_log);
  return out;
}

void sync_block() { current_block().bar.arrive_and_wait(); }

void* block_shared(const void* site, std::size_t bytes, std::size_t align) {
  Block& blk = current_block();
  std::lock_guard<std::mutex> lock(blk.m);
  for (const Block::Shared& s : blk.shared)
    if (s.site == site) return s.ptr;
  // exact size, so AddressSanitizer flags the first byte past the end; 0xff = NaN for floats,
  // like the garbage a GPU's shared memory starts with
  void* p = ::operator new(bytes, std::align_val_t(align));
  std::memset(p, 0xff, bytes);
  blk.shared.push_back({site, p, align});
  return p;
}

void warp_exchange(const void* in, void* out, std::size_t bytes, int src_lane, bool take) {
  Block& blk = current_block();
  const int t = static_cast<int>(threadIdx.x), w = t / kWarp;
  TORCH_CHECK(bytes <= kSlotBytes, "cuda_emu: shuffle of ", bytes, " bytes");
  std::barrier<>& bar = *blk.warp_bars[w];
  std::memcpy(blk.slots[t].data(), in, bytes);
  bar.arrive_and_wait();
  if (take) {
    const int src = w * kWarp + src_lane;
    TORCH_CHECK(src_lane >= 0 && src_lane < kWarp && src < static_cast<int>(blk.slots.size()),
                "cuda_emu: shuffle from lane ", src_lane, " outside the warp");
    std::memcpy(out, blk.slots[src].data(), bytes);
  }
  bar.arrive_and_wait();  // the slots are rewritten by the next shuffle
}

void run_grid(std::string_view name, unsigned int blocks, int threads, void (*body)(const void*),
              const void* ctx) {
  TORCH_CHECK(blocks >= 1 && blocks <= 2147483647u, "cuda_emu: invalid grid of ", blocks, " blocks");
  TORCH_CHECK(threads >= 1 && threads <= 1024, "cuda_emu: invalid block of ", threads, " threads");
  {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_log.push_back(std::string(name) + "@" + std::to_string(blocks));
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Pool& pool = pool_for(threads);
  for (unsigned int b = 0; b < blocks; ++b) {
    Block block(threads);
    pool.run_block({&block, b, blocks, body, ctx});
  }
}

}  // namespace emu
}  // namespace litefpn
