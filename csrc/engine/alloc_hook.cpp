#include "engine/alloc_hook.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace anemll {
namespace {
std::atomic<bool> g_counting{false};
std::atomic<uint64_t> g_count{0};

inline void* counted_alloc(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_count.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
}  // namespace

void set_alloc_counting(bool on) { g_counting.store(on); }
uint64_t alloc_count() { return g_count.load(); }

void alloc_probe() {
  // volatile keeps the compiler from eliding the allocation pair.
  int* volatile p = new int(1);
  delete p;
}

}  // namespace anemll

// Replacements of the global allocation functions (same semantics: malloc/free).
void* operator new(std::size_t n) {
  void* p = anemll::counted_alloc(n);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t n) {
  void* p = anemll::counted_alloc(n);
  if (!p) throw std::bad_alloc();
  return p;
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return anemll::counted_alloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return anemll::counted_alloc(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
