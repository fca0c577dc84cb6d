/* The Core ML backend of the anemll_fast engine (macOS only; coreml_backend.mm).
 *
 * Plain C header: no Objective-C types leak out, so the Cython layer and the
 * C++ engine can include it on every platform (the factory itself only exists
 * in macOS builds, where setup.py defines ANEMLL_FAST_HAVE_COREML).
 *
 *   anemll_coreml_options o;
 *   anemll_coreml_options_init(&o);
 *   o.compute_units = ANEMLL_COREML_CPU_AND_NE;
 *   char err[512];
 *   anemll_backend* be = anemll_coreml_backend_create(&o, err, sizeof err);
 *   ...  // hand `be` to the engine
 *   anemll::delete_backend(be);   // destroy(ctx), then `delete be` (allocated with new)
 */
#ifndef ANEMLL_FAST_COREML_BACKEND_H
#define ANEMLL_FAST_COREML_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "backends/backend_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Same values as MLComputeUnits. */
typedef enum anemll_coreml_compute_units {
  ANEMLL_COREML_CPU_ONLY = 0,
  ANEMLL_COREML_CPU_AND_GPU = 1,
  ANEMLL_COREML_ALL = 2,
  ANEMLL_COREML_CPU_AND_NE = 3 /* macOS 13+ */
} anemll_coreml_compute_units;

/* Where predictions write their outputs (MLPredictionOptions.outputBackings). */
typedef enum anemll_coreml_output_backing {
  /* PIXEL_BUFFER for fp16 outputs when the Neural Engine may run the model
   * (ALL, CPU_AND_NE), else MULTIARRAY. */
  ANEMLL_COREML_BACKING_AUTO = 0,
  /* An MLMultiArray over the engine's own buffer: no copy when Core ML uses it. */
  ANEMLL_COREML_BACKING_MULTIARRAY = 1,
  /* An IOSurface-backed fp16 CVPixelBuffer (the ANE's native output memory).
   * The engine's hidden states and logits are such buffers themselves
   * (alloc_buffer): each part writes the array the next part reads, and the
   * sampler reads the logits in place. Other fp16 outputs get their own pixel
   * buffer, copied once into the engine's buffer honouring its row stride;
   * other dtypes fall back to MULTIARRAY. */
  ANEMLL_COREML_BACKING_PIXEL_BUFFER = 2,
  /* No backing: outputs are copied from whatever Core ML returns. */
  ANEMLL_COREML_BACKING_NONE = 3
} anemll_coreml_output_backing;

typedef struct anemll_coreml_options {
  uint32_t struct_size;   /* sizeof(anemll_coreml_options) */
  int32_t compute_units;  /* anemll_coreml_compute_units; default CPU_AND_NE (as ANEMLL) */
  int32_t output_backing; /* anemll_coreml_output_backing; default AUTO */
  /* Compiled-model cache for .mlpackage inputs; NULL: $ANEMLL_FAST_COREML_CACHE,
   * else ~/Library/Caches/anemll_fast/coreml. Copied at creation. */
  const char* cache_dir;
} anemll_coreml_options;

/* Counters for tests and benchmarks (monotonic over the backend's life). */
typedef struct anemll_coreml_stats {
  uint64_t predictions;       /* successful predict calls */
  uint64_t outputs_in_place;  /* outputs Core ML wrote straight into the engine's buffer */
  uint64_t outputs_copied;    /* outputs copied once into the engine's buffer */
  uint64_t backing_retries;   /* predictions Core ML refused with backings, then ran without */
  uint64_t backing_fallbacks; /* bindings that gave backings up (refused several times in a row) */
  uint64_t compiles;          /* .mlpackage compilations */
  uint64_t cache_hits;        /* .mlpackage loads served from the compiled cache */
  uint64_t state_resets;      /* reset_state calls */
} anemll_coreml_stats;

#if defined(ANEMLL_FAST_HAVE_COREML) || defined(ANEMLL_COREML_IMPLEMENTATION)
/* Defaults: compute_units CPU_AND_NE, output_backing AUTO, cache_dir NULL. */
void anemll_coreml_options_init(anemll_coreml_options* options);

/* A new Core ML backend, or NULL with a message in err (capacity err_size):
 * bad options, or a system older than macOS 13. Release it like every engine
 * backend: backend->destroy(backend->ctx), then `delete backend`
 * (anemll::delete_backend does both). options may be NULL (defaults). */
anemll_backend* anemll_coreml_backend_create(const anemll_coreml_options* options, char* err, size_t err_size);

/* Copies the counters of a backend made by anemll_coreml_backend_create;
 * returns ANEMLL_ERR_INVALID for any other backend. */
int anemll_coreml_backend_stats(const anemll_backend* backend, anemll_coreml_stats* out);

/* Where Core ML would run the model at `path` (.mlmodelc, or .mlpackage compiled
 * through the cache in cache_dir, NULL = default) under compute_units, from
 * MLComputePlan (macOS 14.4+): per function (function_name NULL = all), the
 * number of operations and the sum of their estimated cost per device, as JSON:
 *   {"functions": {"infer": {"ops": {"neural_engine": 812, "gpu": 0, "cpu": 4,
 *    "unassigned": 290}, "cost": {"neural_engine": 0.97, ...}}}}
 * A malloc'd string the caller frees with free(), or NULL with a message in err. */
char* anemll_coreml_compute_plan(const char* path, const char* function_name, int32_t compute_units,
                                 const char* cache_dir, char* err, size_t err_size);

/* Copies state `name` of `state` (made by this backend) into `data` (write == 0),
 * or `data` into it (write != 0): a dense row-major buffer of `dtype`, `shape`
 * (rank dims) and nbytes bytes; floating dtypes convert (fp16 <-> fp32). macOS 15
 * (MLState). Returns ANEMLL_OK or an anemll_status with a message in err. */
int anemll_coreml_state_copy(const anemll_backend* backend, anemll_state* state, const char* name, void* data,
                             size_t nbytes, int32_t dtype, const int64_t* shape, int32_t rank, int write,
                             char* err, size_t err_size);
#endif

#if !defined(ANEMLL_FAST_HAVE_COREML) && !defined(ANEMLL_COREML_IMPLEMENTATION)
/* Builds without Core ML (not macOS): the same calls, failing with a clear
 * message, so that callers (the Cython layer) need no platform conditionals. */
static inline void anemll_coreml_options_init(anemll_coreml_options* options) {
  if (!options) return;
  options->struct_size = (uint32_t)sizeof(anemll_coreml_options);
  options->compute_units = ANEMLL_COREML_CPU_AND_NE;
  options->output_backing = ANEMLL_COREML_BACKING_AUTO;
  options->cache_dir = NULL;
}
static inline anemll_backend* anemll_coreml_backend_create(const anemll_coreml_options* options, char* err,
                                                           size_t err_size) {
  (void)options;
  if (err && err_size) {
    const char msg[] = "coreml backend: not built in (Core ML exists only on macOS)";
    size_t n = sizeof msg < err_size ? sizeof msg : err_size;
    size_t i;
    for (i = 0; i + 1 < n; ++i) err[i] = msg[i];
    err[n - 1] = '\0';
  }
  return NULL;
}
static inline int anemll_coreml_backend_stats(const anemll_backend* backend, anemll_coreml_stats* out) {
  (void)backend;
  (void)out;
  return ANEMLL_ERR_UNSUPPORTED;
}
static inline char* anemll_coreml_compute_plan(const char* path, const char* function_name, int32_t compute_units,
                                               const char* cache_dir, char* err, size_t err_size) {
  (void)path;
  (void)function_name;
  (void)compute_units;
  (void)cache_dir;
  anemll_coreml_backend_create(NULL, err, err_size);
  return NULL;
}
static inline int anemll_coreml_state_copy(const anemll_backend* backend, anemll_state* state, const char* name,
                                           void* data, size_t nbytes, int32_t dtype, const int64_t* shape,
                                           int32_t rank, int write, char* err, size_t err_size) {
  (void)backend;
  (void)state;
  (void)name;
  (void)data;
  (void)nbytes;
  (void)dtype;
  (void)shape;
  (void)rank;
  (void)write;
  if (err && err_size) err[0] = '\0';
  return ANEMLL_ERR_UNSUPPORTED;
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* ANEMLL_FAST_COREML_BACKEND_H */
