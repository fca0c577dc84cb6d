/* A preloaded (LD_PRELOAD) counter of every heap allocation a process makes, for
 * tests/test_alloc_process.py: malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign,
 * valloc and pvalloc are counted between anemll_alloc_window_begin() and anemll_alloc_window_end(),
 * in every thread, then forwarded to glibc. operator new (libstdc++'s, and the extension's own
 * replacement in csrc/engine/alloc_hook.cpp) allocates through malloc or aligned_alloc, so it is counted
 * too, as are std::string, ostringstream and anything else that reaches the heap.
 * glibc only: __libc_* are its exported entry points (no dlsym, which itself allocates). */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <unistd.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);

static int active;
static unsigned long count;

static inline void note(void) {
  if (__atomic_load_n(&active, __ATOMIC_RELAXED)) __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
}

void* malloc(size_t n) { note(); return __libc_malloc(n); }
void* calloc(size_t n, size_t m) { note(); return __libc_calloc(n, m); }
void* realloc(void* p, size_t n) { note(); return __libc_realloc(p, n); }
void* memalign(size_t a, size_t n) { note(); return __libc_memalign(a, n); }
void* aligned_alloc(size_t a, size_t n) { note(); return __libc_memalign(a, n); }
void* valloc(size_t n) { note(); return __libc_memalign((size_t)sysconf(_SC_PAGESIZE), n); }
void* pvalloc(size_t n) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  note();
  return __libc_memalign(page, (n + page - 1) / page * page);
}
int posix_memalign(void** out, size_t a, size_t n) {
  void* p;
  note();
  if (a < sizeof(void*) || (a & (a - 1))) return EINVAL;
  p = __libc_memalign(a, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void anemll_alloc_window_begin(void) {
  __atomic_store_n(&count, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&active, 1, __ATOMIC_SEQ_CST);
}

unsigned long anemll_alloc_window_end(void) {
  __atomic_store_n(&active, 0, __ATOMIC_SEQ_CST);
  return __atomic_load_n(&count, __ATOMIC_SEQ_CST);
}
