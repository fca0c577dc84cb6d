// The Core ML backend: the engine ABI (backends/backend_abi.h) over MLModel.
//
// Built on macOS only (setup.py adds csrc/**/*.mm there); type-checked on Linux
// against sdk_decls/apple_sdk_decls.h by tests/test_coreml_syntax.py.
//
// What happens where:
//   load        .mlmodelc loaded directly; .mlpackage/.mlmodel compiled once
//               into a content-addressed cache (package_cache.h). computeUnits
//               and, on macOS 15+, functionName from the configuration.
//               Default compute units: CPU and Neural Engine, as ANEMLL.
//   make_state  -[MLModel newState]; the state remembers its spec (every state's
//               name, dtype and shape from stateDescriptionsByName) and predict
//               refuses it on a model whose spec differs.
//   reset_state zeroes every state buffer in place (see reset_state_impl).
//   read_state / write_state copy one state buffer out or in through the same
//               mutable view, honouring its strides (a saved KV cache).
//   bind        one MLMultiArray per input over the engine's own memory
//               (initWithDataPointer, no copy), one MLDictionaryFeatureProvider
//               reused for every prediction, and output backings: an
//               MLMultiArray over the engine's buffer, or an IOSurface-backed
//               fp16 CVPixelBuffer where the Neural Engine runs the model.
//   buffers     alloc_buffer: the engine's hidden states and logits in
//               IOSurface-backed fp16 pixel buffers. A part's output backing
//               is then the very MLMultiArray the next part takes as input, so
//               hidden states never cross the host, and the sampler reads the
//               logits where the Neural Engine wrote them (map_buffer locks).
//   predict     @autoreleasepool, stateful or stateless prediction; outputs are
//               left in place when Core ML used the engine's buffer (checked by
//               identity), else copied once honouring the returned array's own
//               dataType and strides. Labels, layouts and copy plans are made
//               at bind time: a prediction allocates nothing on our side.
//   compute plan MLComputePlan (macOS 14.4+): per function, ops and estimated
//               cost per device (anemll_coreml_compute_plan).
// Every entry point catches Objective-C and C++ exceptions inside its
// autorelease pool; nothing escapes, and no C++ exception can unwind through a
// Core ML handler block (their bodies are noexcept).
//
// SDKs. `@available` is a run-time check only: the macOS 15 API (MLState,
// newState, usingState:, functionName, stateDescriptionsByName,
// MLStateConstraint) exists only in the macOS 15 SDK, and MLComputePlan only
// from the macOS 14.4 SDK. Both are also guarded at compile time (as
// coremltools does), so the backend builds with a macOS 14 SDK; such a build
// refuses stateful and multifunction models at load, naming macOS 15.
#define ANEMLL_COREML_IMPLEMENTATION 1
#include "coreml/coreml_backend.h"

#if defined(ANEMLL_COREML_SDK_DECLS)
#include "coreml/sdk_decls/apple_sdk_decls.h"
// The declarations header stands for one SDK (its ANEMLL_SDK_DECLS_MACOS variant).
#define ANEMLL_HAVE_MLSTATE_API ANEMLL_SDK_DECLS_HAVE_MLSTATE
#define ANEMLL_HAVE_COMPUTE_PLAN_API ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN
#else
#import <CoreML/CoreML.h>
#import <CoreVideo/CoreVideo.h>
#import <Foundation/Foundation.h>
#if __has_include(<CoreML/MLState.h>)
#define ANEMLL_HAVE_MLSTATE_API 1
#else
#define ANEMLL_HAVE_MLSTATE_API 0
#endif
#if __has_include(<CoreML/MLComputePlan.h>)
#define ANEMLL_HAVE_COMPUTE_PLAN_API 1
#else
#define ANEMLL_HAVE_COMPUTE_PLAN_API 0
#endif
#endif

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <vector>

#include "coreml/package_cache.h"
#include "coreml/strided_copy.h"

#if !__has_feature(objc_arc)
#error "coreml_backend.mm must be compiled with -fobjc-arc"
#endif

namespace {

namespace fs = std::filesystem;

const char kBackendName[] = "coreml";
constexpr uint32_t kModelMagic = 0x434d4d44u;    // 'CMMD'
constexpr uint32_t kStateMagic = 0x434d5354u;    // 'CMST'
constexpr uint32_t kBindingMagic = 0x434d4244u;  // 'CMBD'
constexpr uint32_t kBufferMagic = 0x434d4246u;   // 'CMBF'
// Lock flags for reading and writing (no flag: Core Video's "not read-only").
const CVPixelBufferLockFlags kLockReadWrite = static_cast<CVPixelBufferLockFlags>(0);

// A pixel buffer the engine binds as its own memory (alloc_buffer), known by
// its address; one MLMultiArray per shape it is bound with.
struct SharedBuffer {
  uint32_t magic = kBufferMagic;
  CVPixelBufferRef pixels = nullptr;  // our +1 reference
  void* key = nullptr;                // base address at creation: what the engine binds
  std::vector<std::vector<int64_t>> view_shapes;
  std::vector<MLMultiArray*> views;
  ~SharedBuffer() {
    views.clear();  // the arrays retain the pixel buffer; drop them before our reference
    if (pixels) CVPixelBufferRelease(pixels);
  }
};

// ------------------------------------------------------------------ handles
struct Ctx {
  anemll_coreml_options opts{};
  std::string cache_dir;  // "" = default root
  MLComputeUnits units = MLComputeUnitsCPUAndNeuralEngine;
  anemll_coreml_stats stats{};
  std::vector<SharedBuffer*> buffers;  // alloc_buffer's, until free_buffer
  // Fixed buffer: reporting an error must not allocate (it may report bad_alloc).
  char err[4096];
};

struct StateSpec {
  std::string name;
  int32_t dtype = 0;  // anemll_dtype, 0 = not representable
  int64_t ml_dtype = 0;
  std::vector<int64_t> shape;
};

struct Model {
  uint32_t magic = kModelMagic;
  MLModel* model = nil;
  std::string path, function, label;
  std::vector<StateSpec> states;  // sorted by name
  std::string state_key;          // canonical text of `states`, "" = stateless
};

struct State {
  uint32_t magic = kStateMagic;
  id state = nil;      // MLState (macOS 15+); typed `id` so that the struct needs no guard
  MLModel* maker = nil;  // re-creates the state if an in-place reset is impossible
  std::string key, maker_label;
  std::vector<std::string> names;
};

// kShared: the engine bound a pixel buffer from alloc_buffer; Core ML writes it
// in place and the next part reads that very array.
enum class Backing { kNone, kMultiArray, kPixelBuffer, kShared };

struct Output {
  std::string name;
  std::string what;  // "<model label>: output '<name>'", for messages made while predicting
  NSString* ns_name = nil;
  int32_t dtype = 0;  // engine dtype
  std::vector<int64_t> shape, strides;
  anemll::coreml_copy::Layout dst;  // the engine's buffer, as a copy destination
  void* data = nullptr;
  size_t nbytes = 0;
  Backing backing = Backing::kNone;
  MLMultiArray* array = nil;          // the backing object handed to Core ML
  CVPixelBufferRef pixels = nullptr;  // our +1 reference for kPixelBuffer
  CVPixelBufferRef shared = nullptr;  // kShared: the engine's buffer is this pixel buffer (not ours to release)
  anemll::coreml_copy::Plan pixel_plan;  // pixel rows (bytesPerRow apart) -> engine buffer
};

// Consecutive failed predictions with output backings after which a binding
// runs without them for good; a single failure only retries without.
constexpr int kMaxBackingFailures = 3;

struct Binding {
  uint32_t magic = kBindingMagic;
  Model* model = nullptr;
  MLModel* ml = nil;
  MLDictionaryFeatureProvider* features = nil;
  MLPredictionOptions* options = nil;        // with output backings when any
  MLPredictionOptions* plain_options = nil;  // without: the fallback
  bool use_backings = false;
  int backing_failures = 0;  // consecutive predictions Core ML refused with backings
  std::vector<Output> outputs;

  ~Binding() {
    for (Output& o : outputs) {
      o.array = nil;  // the array retains the pixel buffer; drop it before our reference
      if (o.pixels) CVPixelBufferRelease(o.pixels);
      o.pixels = nullptr;
    }
  }
};

// ------------------------------------------------------------------ helpers
Ctx* as_ctx(void* c) { return static_cast<Ctx*>(c); }

int set_error(Ctx* c, int code, const std::string& msg) {
  std::snprintf(c->err, sizeof c->err, "%s", msg.c_str());
  return code;
}

int set_error_noalloc(Ctx* c, int code, const char* a, const char* b = "", const char* d = "") {
  std::snprintf(c->err, sizeof c->err, "%s%s%s", a, b, d);
  return code;
}

std::string str(NSString* s) {
  if (s == nil) return std::string();
  const char* u = s.UTF8String;
  return u ? std::string(u) : std::string();
}

NSString* ns(const std::string& s) {
  NSString* out = [NSString stringWithUTF8String:s.c_str()];
  return out ? out : [NSString stringWithUTF8String:"?"];
}

std::string os_version() {
  NSString* v = [NSProcessInfo processInfo].operatingSystemVersionString;
  return v ? str(v) : std::string("an unknown macOS version");
}

std::string describe(NSError* e) {
  if (e == nil) return "unknown Core ML error";
  std::string msg = str(e.localizedDescription);
  if (msg.empty()) msg = "Core ML error";
  return msg + " (" + str(e.domain) + " " + std::to_string(static_cast<long>(e.code)) + ")";
}

std::vector<int64_t> to_vec(NSArray<NSNumber*>* a) {
  std::vector<int64_t> v;
  if (a != nil)
    for (NSUInteger i = 0; i < a.count; ++i) v.push_back([a objectAtIndex:i].longLongValue);
  return v;
}

std::string shape_text(NSArray<NSNumber*>* shape) { return anemll::coreml_copy::shape_str(to_vec(shape)); }

// Waits for a completion handler; false on timeout (the handler's __block
// variables outlive us, so a late call is harmless).
[[maybe_unused]] bool wait_for(dispatch_semaphore_t done, int64_t seconds) {
  return dispatch_semaphore_wait(done, dispatch_time(DISPATCH_TIME_NOW, seconds * static_cast<int64_t>(NSEC_PER_SEC))) == 0;
}

// What a build without the macOS 15 SDK says about the API it lacks.
[[maybe_unused]] const char kNeedsMacOS15SDK[] =
    "needs macOS 15 (MLState, MLModelConfiguration.functionName), and this build of anemll_fast was compiled "
    "with an older SDK: rebuild it with Xcode 16 or newer (the macOS 15 SDK)";

NSArray<NSNumber*>* to_ns(const int64_t* v, int32_t n) {
  std::vector<NSNumber*> items;
  items.reserve(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) items.push_back([NSNumber numberWithLongLong:v[i]]);
  return [NSArray arrayWithObjects:items.data() count:items.size()];
}

// MLMultiArrayDataType <-> anemll_dtype. Core ML multi-arrays hold only these.
int32_t anemll_of(MLMultiArrayDataType t) {
  switch (t) {
    case MLMultiArrayDataTypeFloat16: return ANEMLL_DTYPE_FLOAT16;
    case MLMultiArrayDataTypeFloat32: return ANEMLL_DTYPE_FLOAT32;
    case MLMultiArrayDataTypeDouble: return ANEMLL_DTYPE_FLOAT64;
    case MLMultiArrayDataTypeInt32: return ANEMLL_DTYPE_INT32;
    default: return 0;
  }
}

bool ml_of(int32_t d, MLMultiArrayDataType* out) {
  switch (d) {
    case ANEMLL_DTYPE_FLOAT16: *out = MLMultiArrayDataTypeFloat16; return true;
    case ANEMLL_DTYPE_FLOAT32: *out = MLMultiArrayDataTypeFloat32; return true;
    case ANEMLL_DTYPE_FLOAT64: *out = MLMultiArrayDataTypeDouble; return true;
    case ANEMLL_DTYPE_INT32: *out = MLMultiArrayDataTypeInt32; return true;
    default: return false;
  }
}

std::string ml_dtype_text(MLMultiArrayDataType t) {
  const int32_t d = anemll_of(t);
  if (d) return anemll_dtype_name(d);
  char buf[32];
  std::snprintf(buf, sizeof buf, "Core ML dataType 0x%lx", static_cast<long>(t));
  return buf;
}

std::string names_of(NSDictionary<NSString*, MLFeatureDescription*>* d) {
  std::vector<std::string> v;
  NSArray<NSString*>* keys = d.allKeys;
  for (NSUInteger i = 0; i < keys.count; ++i) v.push_back(str([keys objectAtIndex:i]));
  std::sort(v.begin(), v.end());
  std::string out;
  for (const std::string& s : v) out += (out.empty() ? "" : ", ") + s;
  return out.empty() ? "none" : out;
}

[[maybe_unused]] std::string spec_text(const std::vector<StateSpec>& states) {
  std::string out;
  for (const StateSpec& s : states) {
    if (!out.empty()) out += "; ";
    out += s.name + " " + (s.dtype ? anemll_dtype_name(s.dtype) : "?") + " " +
           anemll::coreml_copy::shape_str(s.shape);
  }
  return out.empty() ? "no states" : out;
}

// Validates one engine tensor descriptor; returns "" when sound.
std::string check_tensor(const anemll_tensor& t, const char* kind) {
  const std::string name = t.name ? t.name : "";
  const std::string where = std::string(kind) + " '" + name + "'";
  if (name.empty()) return std::string(kind) + ": a tensor has no name";
  if (t.rank < 0 || t.rank > ANEMLL_MAX_RANK)
    return where + ": rank " + std::to_string(t.rank) + " outside [0, " + std::to_string(ANEMLL_MAX_RANK) + "]";
  if (!t.data) return where + ": no buffer (data is NULL)";
  const size_t es = anemll_dtype_size(t.dtype);
  if (es == 0) return where + ": unknown dtype code " + std::to_string(t.dtype);
  int64_t last = 0;
  for (int32_t i = 0; i < t.rank; ++i) {
    if (t.shape[i] <= 0) return where + ": dimension " + std::to_string(i) + " is " + std::to_string(t.shape[i]);
    if (t.strides[i] < 0) return where + ": negative stride";
    last += (t.shape[i] - 1) * t.strides[i];
  }
  if (static_cast<uint64_t>(last + 1) * es > t.nbytes)
    return where + ": shape and strides need " + std::to_string(static_cast<uint64_t>(last + 1) * es) +
           " bytes, the buffer has " + std::to_string(t.nbytes);
  return std::string();
}

// Runs an entry point's body with every exception caught, so that nothing
// crosses the C ABI. The pool is outermost: an exception caught inside it
// leaves it normally, so it is drained (a pool exited by an exception is not).
template <class F>
int guarded(Ctx* c, const char* what, int code, F&& body) {
  if (!c) return ANEMLL_ERR_INVALID;
  @autoreleasepool {
    try {
      @try {
        c->err[0] = '\0';
        return body();
      } @catch (NSException* e) {
        const std::string msg = std::string(what) + ": Objective-C exception " + str(e.name) + ": " + str(e.reason);
        return set_error(c, code, msg);
      } @catch (id e) {
        return set_error_noalloc(c, code, what, ": unknown Objective-C exception");
      }
    } catch (const std::bad_alloc&) {
      return set_error_noalloc(c, ANEMLL_ERR_NOMEM, what, ": out of memory");
    } catch (const std::exception& e) {
      return set_error_noalloc(c, code, what, ": ", e.what());
    } catch (...) {
      return set_error_noalloc(c, code, what, ": unknown exception");
    }
  }
}

// ---------------------------------------------------------------- compiling
// The compiled form of a .mlpackage/.mlmodel: from the cache, or compiled now
// and cached. The key includes the OS version because the compiler ships with it.
int compiled_path(Ctx* c, const std::string& package, std::string* out) {
  namespace cc = anemll::coreml_cache;
  std::string err, root = c->cache_dir;
  if (root.empty() && !cc::default_root(&root, &err)) return set_error(c, ANEMLL_ERR_LOAD, package + ": " + err);
  cc::Lookup l;
  if (!cc::lookup(root, package, os_version(), &l, &err))
    return set_error(c, ANEMLL_ERR_LOAD, "compiled-model cache: " + err);
  if (l.hit) {
    c->stats.cache_hits++;
    *out = l.compiled;
    return ANEMLL_OK;
  }
  NSError* error = nil;
  std::error_code dir_ec;
  const bool is_dir = fs::is_directory(package, dir_ec);
  NSURL* url = [NSURL fileURLWithPath:ns(package) isDirectory:is_dir];
  NSURL* tmp = nil;
  bool compiled = false;
#if ANEMLL_HAVE_COMPUTE_PLAN_API
  // The completion-handler form where there is one: the synchronous call is
  // marked to be deprecated (MLModel+MLModelCompilation.h).
  if (@available(macOS 14.4, *)) {
    __block NSURL* got = nil;
    __block NSError* got_error = nil;
    dispatch_semaphore_t done = dispatch_semaphore_create(0);
    [MLModel compileModelAtURL:url
             completionHandler:^(NSURL* compiled_url, NSError* e) {
               got = compiled_url;  // plain assignments: nothing here can throw
               got_error = e;
               dispatch_semaphore_signal(done);
             }];
    if (!wait_for(done, 3600)) return set_error(c, ANEMLL_ERR_LOAD, package + ": Core ML did not compile it within an hour");
    tmp = got;
    error = got_error;
    compiled = true;
  }
#endif
  if (!compiled) tmp = [MLModel compileModelAtURL:url error:&error];
  if (tmp == nil) return set_error(c, ANEMLL_ERR_LOAD, package + ": Core ML cannot compile it: " + describe(error));
  const std::string tmp_path = str(tmp.path);
  const bool ok = cc::install(root, l, tmp_path, &err);
  std::error_code ec;
  fs::remove_all(tmp_path, ec);  // left behind only when it had to be copied
  if (!ok) return set_error(c, ANEMLL_ERR_LOAD, package + ": " + err);
  c->stats.compiles++;
  *out = l.compiled;
  return ANEMLL_OK;
}

// The compiled model (.mlmodelc) of a model path: itself, or compiled and cached.
int resolve_compiled(Ctx* c, const std::string& p, std::string* compiled) {
  std::string ext = fs::path(p).has_filename() ? fs::path(p).extension().string()
                                               : fs::path(p).parent_path().extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (ext == ".mlmodelc") {
    *compiled = p;
    return ANEMLL_OK;
  }
  if (ext == ".mlpackage" || ext == ".mlmodel") return compiled_path(c, p, compiled);
  return set_error(c, ANEMLL_ERR_LOAD, p + ": not a Core ML model (expected .mlmodelc, .mlpackage or .mlmodel)");
}

// ------------------------------------------------------------------ load
int load_impl(Ctx* c, const char* path, const char* function_name, anemll_model** out) {
  if (!out) return set_error(c, ANEMLL_ERR_INVALID, "load: out is NULL");
  *out = nullptr;
  if (!path || !*path) return set_error(c, ANEMLL_ERR_INVALID, "load: empty model path");
  const std::string p = path;
  const std::string fn = function_name ? function_name : "";
  std::error_code ec;
  if (!fs::exists(p, ec)) return set_error(c, ANEMLL_ERR_LOAD, p + ": no such file or directory");
  std::string compiled;
  if (int rc = resolve_compiled(c, p, &compiled)) return rc;

  MLModelConfiguration* config = [[MLModelConfiguration alloc] init];
  config.computeUnits = c->units;
  if (!fn.empty()) {
#if ANEMLL_HAVE_MLSTATE_API
    if (@available(macOS 15.0, *)) {
      config.functionName = ns(fn);
    } else {
      return set_error(c, ANEMLL_ERR_UNSUPPORTED,
                       p + ": loading function '" + fn + "' of a multifunction model needs macOS 15 "
                       "(MLModelConfiguration.functionName); this is " + os_version());
    }
#else
    return set_error(c, ANEMLL_ERR_UNSUPPORTED,
                     p + ": loading function '" + fn + "' of a multifunction model " + kNeedsMacOS15SDK);
#endif
  }
  NSError* error = nil;
  MLModel* ml = [MLModel modelWithContentsOfURL:[NSURL fileURLWithPath:ns(compiled) isDirectory:YES]
                                  configuration:config
                                          error:&error];
  if (ml == nil)
    return set_error(c, ANEMLL_ERR_LOAD, p + (fn.empty() ? "" : " function '" + fn + "'") +
                                             ": Core ML cannot load it: " + describe(error) + " [" + os_version() + "]");

#if !ANEMLL_HAVE_MLSTATE_API
  // Without the macOS 15 SDK the state API cannot be named, but a macOS 15
  // system still describes a stateful model's states: ask for them by key, so
  // that such a model fails here, by name, rather than at its first prediction.
  NSString* states_key = ns("stateDescriptionsByName");
  MLModelDescription* described = ml.modelDescription;
  if ([described respondsToSelector:NSSelectorFromString(states_key)]) {
    id states = [described valueForKey:states_key];
    if ([states isKindOfClass:[NSDictionary class]] && ((NSDictionary*)states).count > 0)
      return set_error(c, ANEMLL_ERR_UNSUPPORTED, p + ": a stateful model (KV cache) " + kNeedsMacOS15SDK);
  }
#endif
  auto* m = new Model();
  m->model = ml;
  m->path = p;
  m->function = fn;
  m->label = fs::path(p).filename().string() + (fn.empty() ? "" : " function '" + fn + "'");
#if ANEMLL_HAVE_MLSTATE_API
  if (@available(macOS 15.0, *)) {
    NSDictionary<NSString*, MLFeatureDescription*>* states = ml.modelDescription.stateDescriptionsByName;
    NSArray<NSString*>* keys = states.allKeys;
    for (NSUInteger i = 0; i < keys.count; ++i) {
      MLFeatureDescription* d = [states objectForKey:[keys objectAtIndex:i]];
      StateSpec s;
      s.name = str([keys objectAtIndex:i]);
      MLStateConstraint* sc = d.stateConstraint;
      if (sc != nil) {
        s.ml_dtype = static_cast<int64_t>(sc.dataType);
        s.dtype = anemll_of(sc.dataType);
        s.shape = to_vec(sc.bufferShape);
      }
      m->states.push_back(std::move(s));
    }
    std::sort(m->states.begin(), m->states.end(),
              [](const StateSpec& a, const StateSpec& b) { return a.name < b.name; });
    m->state_key = m->states.empty() ? std::string() : spec_text(m->states);
  }
#endif
  *out = reinterpret_cast<anemll_model*>(m);
  return ANEMLL_OK;
}

// An opaque handle back to our type, refused (with a message naming `what`)
// unless it carries the type's magic: a foreign or freed handle never passes.
template <class T>
T* checked_handle(Ctx* c, void* h, uint32_t magic, const char* what, const char* not_ours) {
  auto* t = reinterpret_cast<T*>(h);
  if (!t || t->magic != magic) {
    set_error_noalloc(c, ANEMLL_ERR_INVALID, what, not_ours);
    return nullptr;
  }
  return t;
}

Model* model_of(Ctx* c, anemll_model* h, const char* what) {
  return checked_handle<Model>(c, h, kModelMagic, what, ": not a model loaded by the Core ML backend");
}

State* state_of(Ctx* c, anemll_state* h, const char* what) {
  return checked_handle<State>(c, h, kStateMagic, what, ": not a state made by the Core ML backend");
}

Binding* binding_of(Ctx* c, anemll_binding* h, const char* what) {
  return checked_handle<Binding>(c, h, kBindingMagic, what, ": not a binding made by the Core ML backend");
}

// ------------------------------------------------------------------ states
int make_state_impl(Ctx* c, anemll_model* mh, anemll_state** out) {
  if (!out) return set_error(c, ANEMLL_ERR_INVALID, "make_state: out is NULL");
  *out = nullptr;
  Model* m = model_of(c, mh, "make_state");
  if (!m) return ANEMLL_ERR_INVALID;
#if ANEMLL_HAVE_MLSTATE_API
  if (@available(macOS 15.0, *)) {
    if (m->states.empty())
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": the model declares no state (stateDescriptionsByName is empty)");
    MLState* st = [m->model newState];
    if (st == nil) return set_error(c, ANEMLL_ERR_PREDICT, m->label + ": Core ML returned no state from newState");
    auto* s = new State();
    s->state = st;
    s->maker = m->model;
    s->key = m->state_key;
    s->maker_label = m->label;
    for (const StateSpec& spec : m->states) s->names.push_back(spec.name);
    *out = reinterpret_cast<anemll_state*>(s);
    return ANEMLL_OK;
  } else {
    return set_error(c, ANEMLL_ERR_UNSUPPORTED,
                     m->label + ": stateful models (MLState, the KV cache) need macOS 15; this is " + os_version());
  }
#else
  return set_error(c, ANEMLL_ERR_UNSUPPORTED, m->label + ": a stateful model (MLState, the KV cache) " + kNeedsMacOS15SDK);
#endif
}

// A Core ML handler block's body: must not throw (an exception unwinding
// through Core ML's frames is undefined behaviour).
[[maybe_unused]] void zero_bytes(void* bytes, NSInteger size) noexcept {
  if (bytes && size > 0) std::memset(bytes, 0, static_cast<size_t>(size));
}

// Core ML has no "reset" for an MLState. Its documented mutable view
// (getMultiArrayForStateNamed:handler:) lets us zero every buffer in place:
// one memset, same MLState object, no reload. Should a buffer not be reachable
// that way, the state is re-created with newState (documented to start at
// zero) and swapped inside our handle, so the engine's pointer stays valid.
int reset_state_impl(Ctx* c, anemll_state* sh) {
  State* s = state_of(c, sh, "reset_state");
  if (!s) return ANEMLL_ERR_INVALID;
#if ANEMLL_HAVE_MLSTATE_API
  if (@available(macOS 15.0, *)) {
    MLState* st = (MLState*)s->state;
    bool all = true;
    for (const std::string& name : s->names) {
      __block bool done = false;
      [st getMultiArrayForStateNamed:ns(name)
                             handler:^(MLMultiArray* buffer) {
                               [buffer getMutableBytesWithHandler:^(void* bytes, NSInteger size, NSArray<NSNumber*>* strides) {
                                 (void)strides;  // padding included: zeroing the whole allocation is right
                                 zero_bytes(bytes, size);
                                 done = true;
                               }];
                             }];
      all = all && done;
    }
    if (!all) {
      MLState* fresh = [s->maker newState];
      if (fresh == nil)
        return set_error(c, ANEMLL_ERR_PREDICT, s->maker_label + ": cannot reset the state: newState returned nil");
      s->state = fresh;
    }
    c->stats.state_resets++;
    return ANEMLL_OK;
  } else {
    return set_error(c, ANEMLL_ERR_UNSUPPORTED, "reset_state: states need macOS 15; this is " + os_version());
  }
#else
  return set_error(c, ANEMLL_ERR_UNSUPPORTED, std::string("reset_state: a stateful model ") + kNeedsMacOS15SDK);
#endif
}

// Context switching: every state of `dst` from the same-named state of `src`, over the leading part of each
// dimension both have (the KV-cache length differs), the rest zeroed; both through the documented mutable
// views of getMultiArrayForStateNamed:, honouring each buffer's own strides.
int copy_state_impl(Ctx* c, anemll_state* srch, anemll_state* dsth) {
  State* src = state_of(c, srch, "copy_state");
  State* dst = state_of(c, dsth, "copy_state");
  if (!src || !dst) return ANEMLL_ERR_INVALID;
#if ANEMLL_HAVE_MLSTATE_API
  if (@available(macOS 15.0, *)) {
    for (const std::string& name : dst->names) {
      if (std::find(src->names.begin(), src->names.end(), name) == src->names.end())
        return set_error(c, ANEMLL_ERR_INVALID, "copy_state: state " + name + " of " + dst->maker_label +
                                                    " is not in the state made by " + src->maker_label);
      __block std::string problem;
      __block bool done = false;
      [(MLState*)src->state getMultiArrayForStateNamed:ns(name) handler:^(MLMultiArray* from) {
        [(MLState*)dst->state getMultiArrayForStateNamed:ns(name) handler:^(MLMultiArray* to) {
          const NSUInteger rank = to.shape.count;
          if (from.shape.count != rank || from.dataType != to.dataType || rank == 0) {
            problem = "rank or data type differs";
            return;
          }
          const size_t elem = to.dataType == MLMultiArrayDataTypeFloat16 ? 2 : to.dataType == MLMultiArrayDataTypeFloat32 ||
                                      to.dataType == MLMultiArrayDataTypeInt32 ? 4 : 0;
          if (elem == 0) {
            problem = "unsupported data type";
            return;
          }
          std::vector<int64_t> common(rank), sst(rank);
          for (NSUInteger k = 0; k < rank; ++k) {
            common[k] = std::min([[from.shape objectAtIndex:k] longLongValue], [[to.shape objectAtIndex:k] longLongValue]);
            sst[k] = [[from.strides objectAtIndex:k] longLongValue];
          }
          [from getBytesWithHandler:^(const void* sbytes, NSInteger ssize) {
            [to getMutableBytesWithHandler:^(void* dbytes, NSInteger dsize, NSArray<NSNumber*>* strides) {
              if (!sbytes || !dbytes) return;
              std::vector<int64_t> dstst(rank);
              for (NSUInteger k = 0; k < rank; ++k) dstst[k] = [[strides objectAtIndex:k] longLongValue];
              std::memset(dbytes, 0, static_cast<size_t>(dsize));
              // Walk every index of the leading dimensions; the last one is copied as a run.
              std::vector<int64_t> idx(rank, 0);
              const int64_t run = common[rank - 1];
              for (;;) {
                for (NSUInteger k = 0; k + 1 < rank; ++k)
                  if (idx[k] >= common[k]) return;
                int64_t so = 0, dofs = 0;
                for (NSUInteger k = 0; k < rank; ++k) so += idx[k] * sst[k], dofs += idx[k] * dstst[k];
                const bool contiguous = sst[rank - 1] == 1 && dstst[rank - 1] == 1;
                if ((so + run) * static_cast<int64_t>(elem) > ssize || (dofs + run) * static_cast<int64_t>(elem) > dsize)
                  return;
                if (contiguous) {
                  std::memcpy(static_cast<char*>(dbytes) + dofs * elem, static_cast<const char*>(sbytes) + so * elem,
                              static_cast<size_t>(run) * elem);
                } else {
                  for (int64_t j = 0; j < run; ++j)
                    std::memcpy(static_cast<char*>(dbytes) + (dofs + j * dstst[rank - 1]) * elem,
                                static_cast<const char*>(sbytes) + (so + j * sst[rank - 1]) * elem, elem);
                }
                done = true;
                // Next index of the leading dimensions (odometer).
                NSUInteger k = rank - 1;
                while (k > 0) {
                  --k;
                  if (++idx[k] < common[k]) break;
                  if (k == 0) return;
                  idx[k] = 0;
                }
                if (rank == 1) return;
              }
            }];
          }];
        }];
      }];
      if (!problem.empty())
        return set_error(c, ANEMLL_ERR_INVALID, "copy_state: state " + name + ": " + problem);
      if (!done)
        return set_error(c, ANEMLL_ERR_PREDICT, "copy_state: state " + name + " could not be read or written");
    }
    return ANEMLL_OK;
  } else {
    return set_error(c, ANEMLL_ERR_UNSUPPORTED, "copy_state: states need macOS 15; this is " + os_version());
  }
#else
  return set_error(c, ANEMLL_ERR_UNSUPPORTED, std::string("copy_state: a stateful model ") + kNeedsMacOS15SDK);
#endif
}

// Copies state tensor `name` out of (write=false) or into (write=true) a dense
// engine buffer of `nbytes`, through the MLMultiArray view Core ML lends for the
// duration of the handler, honouring that view's dtype and strides.
int state_io_impl(Ctx* c, anemll_state* sh, const char* name, void* dense, size_t nbytes, bool write) {
  const char* what = write ? "write_state" : "read_state";
  State* s = state_of(c, sh, what);
  if (!s) return ANEMLL_ERR_INVALID;
  if (!name || !dense) return set_error(c, ANEMLL_ERR_INVALID, std::string(what) + ": name or buffer is NULL");
  const std::string label = std::string(what) + ": state '" + name + "'";
  if (std::find(s->names.begin(), s->names.end(), std::string(name)) == s->names.end())
    return set_error(c, ANEMLL_ERR_INVALID, label + ": the state (made by " + s->maker_label + ") has no such buffer");
#if ANEMLL_HAVE_MLSTATE_API
  if (@available(macOS 15.0, *)) {
    MLState* st = (MLState*)s->state;
    __block bool seen = false, ok = false;
    __block std::string problem;
    std::vector<char> err_buf(512, '\0');
    char* err = err_buf.data();
    const size_t err_size = err_buf.size();
    const char* label_c = label.c_str();
    [st getMultiArrayForStateNamed:ns(name)
                           handler:^(MLMultiArray* buffer) {
                             seen = true;
                             const int32_t dtype = anemll_of(buffer.dataType);
                             const std::vector<int64_t> shape = to_vec(buffer.shape);
                             std::vector<int64_t> dense_strides(shape.size(), 1);
                             size_t count = 1;
                             for (size_t k = shape.size(); k-- > 0;) {
                               dense_strides[k] = static_cast<int64_t>(count);
                               count *= static_cast<size_t>(shape[k]);
                             }
                             const size_t dense_bytes = count * anemll_dtype_size(dtype);
                             __block anemll::coreml_copy::Layout flat;
                             if (!dtype || dense_bytes != nbytes ||
                                 !anemll::coreml_copy::make_layout(dtype, shape.data(), dense_strides.data(),
                                                                   static_cast<int32_t>(shape.size()), nbytes, &flat)) {
                               problem = std::string(label_c) + ": holds " + std::to_string(dense_bytes) + " bytes of " +
                                         ml_dtype_text(buffer.dataType) + ", the engine gives " + std::to_string(nbytes);
                               return;
                             }
                             [buffer getMutableBytesWithHandler:^(void* bytes, NSInteger size, NSArray<NSNumber*>* strides) {
                               const std::vector<int64_t> view_strides = to_vec(strides);
                               anemll::coreml_copy::Layout view;
                               if (!bytes || view_strides.size() != shape.size() ||
                                   !anemll::coreml_copy::make_layout(dtype, shape.data(), view_strides.data(),
                                                                     static_cast<int32_t>(shape.size()),
                                                                     size > 0 ? static_cast<size_t>(size) : 0, &view))
                                 return;
                               ok = write ? anemll::coreml_copy::copy(flat, dense, view, bytes, label_c, err, err_size)
                                          : anemll::coreml_copy::copy(view, bytes, flat, dense, label_c, err, err_size);
                             }];
                           }];
    if (!ok) {
      const std::string why = !problem.empty() ? problem : err[0] ? std::string(err)
                                                 : label + (seen ? ": Core ML lent no bytes" : ": Core ML lent no buffer");
      return set_error(c, ANEMLL_ERR_PREDICT, why);
    }
    return ANEMLL_OK;
  } else {
    return set_error(c, ANEMLL_ERR_UNSUPPORTED, label + ": states need macOS 15; this is " + os_version());
  }
#else
  (void)nbytes;
  (void)write;
  return set_error(c, ANEMLL_ERR_UNSUPPORTED, label + ": a stateful model " + kNeedsMacOS15SDK);
#endif
}

// ------------------------------------------------------------------ binding
bool ane_may_run(MLComputeUnits u) { return u == MLComputeUnitsAll || u == MLComputeUnitsCPUAndNeuralEngine; }

// An IOSurface-backed fp16 pixel buffer shaped [prod(shape[:-1]), shape[-1]]
// wrapped as an MLMultiArray; nil (and pixels NULL) when Core Video refuses.
// A pixel buffer's geometry for a shape: width = last dim, height = the rest.
bool pixel_geometry(const std::vector<int64_t>& shape, int64_t* width, int64_t* height) {
  if (shape.empty()) return false;
  *width = shape.back();
  *height = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) *height *= shape[i];
  return *width > 0 && *height > 0;
}

// An IOSurface-backed OneComponent16Half pixel buffer (+1), or NULL.
CVPixelBufferRef create_pixels(int64_t width, int64_t height) {
  NSDictionary* surface_props = [[NSDictionary alloc] init];  // present and empty: allocate via IOSurface
  id<NSCopying> keys[1] = {(__bridge NSString*)kCVPixelBufferIOSurfacePropertiesKey};
  id values[1] = {surface_props};
  NSDictionary* attrs = [NSDictionary dictionaryWithObjects:values forKeys:keys count:1];
  CVPixelBufferRef pb = nullptr;
  const CVReturn rc = CVPixelBufferCreate(kCFAllocatorDefault, static_cast<size_t>(width), static_cast<size_t>(height),
                                          kCVPixelFormatType_OneComponent16Half, (__bridge CFDictionaryRef)attrs, &pb);
  return rc == kCVReturnSuccess ? pb : nullptr;
}

// The pixel buffer as an MLMultiArray of `shape`, or nil. Declared nonnull:
// Core ML reports a buffer it cannot wrap by throwing, not by returning nil;
// either way the caller falls back to a plain backing.
MLMultiArray* wrap_pixels(CVPixelBufferRef pb, const std::vector<int64_t>& shape) {
  @try {
    return [[MLMultiArray alloc] initWithPixelBuffer:pb shape:to_ns(shape.data(), static_cast<int32_t>(shape.size()))];
  } @catch (NSException* e) {
    return nil;
  }
}

MLMultiArray* pixel_backing(const Output& o, CVPixelBufferRef* pixels) {
  *pixels = nullptr;
  int64_t width, height;
  if (!pixel_geometry(o.shape, &width, &height)) return nil;
  CVPixelBufferRef pb = create_pixels(width, height);
  if (pb == nullptr) return nil;
  MLMultiArray* arr = wrap_pixels(pb, o.shape);
  if (arr == nil) {
    CVPixelBufferRelease(pb);
    return nil;
  }
  *pixels = pb;
  return arr;
}

SharedBuffer* shared_at(Ctx* c, const void* data) {
  for (SharedBuffer* sb : c->buffers)
    if (sb->key == data) return sb;
  return nullptr;
}

// The shared buffer as an MLMultiArray of `shape` (the same object for every
// binding of that shape), or nil when the shape does not fit its geometry.
MLMultiArray* shared_view(SharedBuffer* sb, const int64_t* shape, int32_t rank) {
  const std::vector<int64_t> s(shape, shape + rank);
  for (size_t i = 0; i < sb->view_shapes.size(); ++i)
    if (sb->view_shapes[i] == s) return sb->views[i];
  int64_t width, height;
  if (!pixel_geometry(s, &width, &height) || static_cast<size_t>(width) != CVPixelBufferGetWidth(sb->pixels) ||
      static_cast<size_t>(height) != CVPixelBufferGetHeight(sb->pixels))
    return nil;
  MLMultiArray* arr = wrap_pixels(sb->pixels, s);
  if (arr != nil) {
    sb->view_shapes.push_back(s);
    sb->views.push_back(arr);
  }
  return arr;
}

// The copy from a pixel backing's rows (the flattened leading dimensions,
// bytesPerRow apart) into the engine's buffer, planned once at bind time.
bool pixel_plan(const Output& o, anemll::coreml_copy::Plan* out) {
  const size_t bpr = CVPixelBufferGetBytesPerRow(o.pixels);
  const size_t height = CVPixelBufferGetHeight(o.pixels);
  if (bpr % 2 != 0 || o.shape.empty()) return false;
  anemll::coreml_copy::Layout src;
  src.dtype = ANEMLL_DTYPE_FLOAT16;
  src.rank = static_cast<int32_t>(o.shape.size());
  for (int32_t k = 0; k < src.rank; ++k) {
    src.shape[k] = o.shape[static_cast<size_t>(k)];
    src.strides[k] = 1;
  }
  if (src.rank >= 2) {
    src.strides[src.rank - 2] = static_cast<int64_t>(bpr / 2);
    for (int32_t k = src.rank - 2; k-- > 0;) src.strides[k] = src.strides[k + 1] * src.shape[k + 1];
  }
  src.nbytes = bpr * height;
  char err[512];
  return anemll::coreml_copy::plan(src, o.dst, o.what.c_str(), out, err, sizeof err);
}

int bind_impl(Ctx* c, anemll_model* mh, const anemll_tensor* inputs, int32_t n_inputs, const anemll_tensor* outputs,
              int32_t n_outputs, anemll_binding** out) {
  if (!out) return set_error(c, ANEMLL_ERR_INVALID, "bind: out is NULL");
  *out = nullptr;
  Model* m = model_of(c, mh, "bind");
  if (!m) return ANEMLL_ERR_INVALID;
  if (n_inputs < 0 || n_outputs < 0 || (n_inputs > 0 && !inputs) || (n_outputs > 0 && !outputs))
    return set_error(c, ANEMLL_ERR_INVALID, m->label + ": bind: bad tensor arrays");
  MLModelDescription* desc = m->model.modelDescription;
  NSDictionary<NSString*, MLFeatureDescription*>* in_desc = desc.inputDescriptionsByName;
  NSDictionary<NSString*, MLFeatureDescription*>* out_desc = desc.outputDescriptionsByName;

  // Inputs: one MLMultiArray over each engine buffer, created once.
  NSMutableDictionary<NSString*, id>* features = [NSMutableDictionary dictionaryWithCapacity:static_cast<NSUInteger>(n_inputs)];
  std::vector<std::string> bound;
  for (int32_t i = 0; i < n_inputs; ++i) {
    const anemll_tensor& t = inputs[i];
    const std::string bad = check_tensor(t, "input");
    if (!bad.empty()) return set_error(c, ANEMLL_ERR_INVALID, m->label + ": " + bad);
    const std::string name = t.name;
    if (std::find(bound.begin(), bound.end(), name) != bound.end())
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + name + "' is bound twice");
    bound.push_back(name);
    NSString* key = ns(name);
    MLFeatureDescription* d = [in_desc objectForKey:key];
    if (d == nil)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": no input named '" + name + "' (inputs: " + names_of(in_desc) + ")");
    if (d.type != MLFeatureTypeMultiArray || d.multiArrayConstraint == nil)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + name + "' is not a multi-array");
    MLMultiArrayDataType dt;
    if (!ml_of(t.dtype, &dt))
      return set_error(c, ANEMLL_ERR_UNSUPPORTED, m->label + ": input '" + name + "': " +
                                                      anemll_dtype_name(t.dtype) +
                                                      " has no Core ML multi-array type");
    if (d.multiArrayConstraint.dataType != dt)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + name + "': the engine binds " +
                                                  anemll_dtype_name(t.dtype) + ", the model takes " +
                                                  ml_dtype_text(d.multiArrayConstraint.dataType));
    NSError* error = nil;
    MLMultiArray* arr = nil;
    if (SharedBuffer* sb = shared_at(c, t.data)) {
      // The previous part's output backing itself: no host copy in between.
      arr = shared_view(sb, t.shape, t.rank);
      if (arr == nil)
        return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + name + "': shape " +
                                                    anemll::coreml_copy::shape_str(std::vector<int64_t>(t.shape, t.shape + t.rank)) +
                                                    " does not fit the pixel buffer it shares");
    } else {
      arr = [[MLMultiArray alloc] initWithDataPointer:t.data
                                                shape:to_ns(t.shape, t.rank)
                                             dataType:dt
                                              strides:to_ns(t.strides, t.rank)
                                          deallocator:nil
                                                error:&error];
    }
    if (arr == nil)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + name + "': cannot wrap the buffer: " + describe(error));
    MLFeatureValue* fv = [MLFeatureValue featureValueWithMultiArray:arr];
    if (![d isAllowedValue:fv])
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + name + "': shape " + shape_text(arr.shape) +
                                                  " is not accepted (the model declares " +
                                                  shape_text(d.multiArrayConstraint.shape) + ")");
    [features setObject:fv forKey:key];
  }
  NSArray<NSString*>* in_names = in_desc.allKeys;
  for (NSUInteger i = 0; i < in_names.count; ++i) {
    NSString* k = [in_names objectAtIndex:i];
    if ([features objectForKey:k] == nil && ![in_desc objectForKey:k].optional)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": input '" + str(k) + "' is required but not bound");
  }
  NSError* error = nil;
  MLDictionaryFeatureProvider* provider = [[MLDictionaryFeatureProvider alloc] initWithDictionary:features error:&error];
  if (provider == nil)
    return set_error(c, ANEMLL_ERR_INVALID, m->label + ": cannot build the input features: " + describe(error));

  // Outputs: a backing per output where Core ML accepts one.
  std::unique_ptr<Binding> b(new Binding());
  b->model = m;
  b->ml = m->model;
  b->features = provider;
  b->plain_options = [[MLPredictionOptions alloc] init];
  NSMutableDictionary<NSString*, id>* backings = [NSMutableDictionary dictionaryWithCapacity:static_cast<NSUInteger>(n_outputs)];
  const int32_t mode = c->opts.output_backing;
  for (int32_t i = 0; i < n_outputs; ++i) {
    const anemll_tensor& t = outputs[i];
    const std::string bad = check_tensor(t, "output");
    if (!bad.empty()) return set_error(c, ANEMLL_ERR_INVALID, m->label + ": " + bad);
    Output o;
    o.name = t.name;
    for (const Output& prev : b->outputs)
      if (prev.name == o.name) return set_error(c, ANEMLL_ERR_INVALID, m->label + ": output '" + o.name + "' is bound twice");
    o.ns_name = ns(o.name);
    o.what = m->label + ": output '" + o.name + "'";
    o.dtype = t.dtype;
    o.shape.assign(t.shape, t.shape + t.rank);
    o.strides.assign(t.strides, t.strides + t.rank);
    o.data = t.data;
    o.nbytes = t.nbytes;
    anemll::coreml_copy::make_layout(t.dtype, t.shape, t.strides, t.rank, t.nbytes, &o.dst);  // rank checked above
    MLFeatureDescription* d = [out_desc objectForKey:o.ns_name];
    if (d == nil)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": no output named '" + o.name + "' (outputs: " + names_of(out_desc) + ")");
    if (d.type != MLFeatureTypeMultiArray || d.multiArrayConstraint == nil)
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": output '" + o.name + "' is not a multi-array");
    const MLMultiArrayDataType model_dt = d.multiArrayConstraint.dataType;
    const int32_t model_d = anemll_of(model_dt);
    if (!model_d || !anemll::coreml_copy::convertible(model_d, o.dtype))
      return set_error(c, ANEMLL_ERR_INVALID, m->label + ": output '" + o.name + "': the model produces " +
                                                  ml_dtype_text(model_dt) + ", the engine reads " +
                                                  anemll_dtype_name(o.dtype));
    SharedBuffer* sb = shared_at(c, t.data);
    if (sb) {
      // Engine memory that is a pixel buffer: the backing is the array the
      // next part reads. A refused backing is copied into it (locked).
      o.shared = sb->pixels;
      o.array = shared_view(sb, t.shape, t.rank);
      if (o.array == nil || model_d != ANEMLL_DTYPE_FLOAT16)
        return set_error(c, ANEMLL_ERR_INVALID, o.what + ": shape " + anemll::coreml_copy::shape_str(o.shape) + " " +
                                                    ml_dtype_text(model_dt) + " does not fit the pixel buffer it shares");
      o.backing = [d isAllowedValue:[MLFeatureValue featureValueWithMultiArray:o.array]] ? Backing::kShared : Backing::kNone;
      if (o.backing == Backing::kShared) [backings setObject:o.array forKey:o.ns_name];
      b->outputs.push_back(std::move(o));
      continue;
    }
    Backing want = Backing::kNone;
    if (mode == ANEMLL_COREML_BACKING_PIXEL_BUFFER ||
        (mode == ANEMLL_COREML_BACKING_AUTO && ane_may_run(c->units)))
      want = (o.dtype == ANEMLL_DTYPE_FLOAT16 && model_d == ANEMLL_DTYPE_FLOAT16) ? Backing::kPixelBuffer
                                                                                 : Backing::kMultiArray;
    else if (mode == ANEMLL_COREML_BACKING_MULTIARRAY || mode == ANEMLL_COREML_BACKING_AUTO)
      want = Backing::kMultiArray;
    if (want == Backing::kMultiArray && model_d != o.dtype) want = Backing::kNone;  // Core ML writes its own dtype
    if (want == Backing::kPixelBuffer) {
      o.array = pixel_backing(o, &o.pixels);
      if (o.array == nil || !pixel_plan(o, &o.pixel_plan)) {  // e.g. a shape Core Video cannot allocate
        o.array = nil;
        if (o.pixels) CVPixelBufferRelease(o.pixels);
        o.pixels = nullptr;
        want = Backing::kMultiArray;
      }
    }
    if (want == Backing::kMultiArray) {
      MLMultiArrayDataType dt;
      ml_of(o.dtype, &dt);
      NSError* e2 = nil;
      o.array = [[MLMultiArray alloc] initWithDataPointer:o.data
                                                    shape:to_ns(t.shape, t.rank)
                                                 dataType:dt
                                                  strides:to_ns(t.strides, t.rank)
                                              deallocator:nil
                                                    error:&e2];
      if (o.array == nil) want = Backing::kNone;
    }
    // The documented rule: a backing must pass the output's isAllowedValue:, else
    // the prediction fails. Outputs whose shape the engine binds differently
    // (flexible models) are copied instead.
    if (want != Backing::kNone && ![d isAllowedValue:[MLFeatureValue featureValueWithMultiArray:o.array]]) want = Backing::kNone;
    if (want == Backing::kNone) {
      o.array = nil;
      if (o.pixels) CVPixelBufferRelease(o.pixels);
      o.pixels = nullptr;
    } else {
      [backings setObject:o.array forKey:o.ns_name];
    }
    o.backing = want;
    b->outputs.push_back(std::move(o));
  }
  if (backings.count > 0) {
    b->options = [[MLPredictionOptions alloc] init];
    b->options.outputBackings = backings;
    b->use_backings = true;
  } else {
    b->options = b->plain_options;
  }
  *out = reinterpret_cast<anemll_binding*>(b.release());
  return ANEMLL_OK;
}

// ------------------------------------------------------------------ predict
// Copies a pixel-buffer backing into the engine's buffer with the plan made at
// bind time. Allocation-free.
int copy_from_pixels(Ctx* c, const Output& o) {
  if (CVPixelBufferLockBaseAddress(o.pixels, kCVPixelBufferLock_ReadOnly) != kCVReturnSuccess)
    return set_error_noalloc(c, ANEMLL_ERR_PREDICT, o.what.c_str(), ": cannot lock its pixel buffer");
  const void* base = CVPixelBufferGetBaseAddress(o.pixels);
  if (base) anemll::coreml_copy::run(o.pixel_plan, base, o.data);
  CVPixelBufferUnlockBaseAddress(o.pixels, kCVPixelBufferLock_ReadOnly);
  if (!base) return set_error_noalloc(c, ANEMLL_ERR_PREDICT, o.what.c_str(), ": its pixel buffer has no base address");
  return ANEMLL_OK;
}

// The body of getBytesWithHandler: plans and runs the copy of `bytes`, or
// leaves a message in err. noexcept: it runs inside Core ML's frames.
enum CopyStatus { kCopyNotCalled = 0, kCopied, kCopyRefused, kCopyNoBytes };
int copy_bytes(const void* bytes, NSInteger size, anemll::coreml_copy::Layout* src, const Output* o, void* dst,
               char* err, size_t err_size) noexcept {
  if (bytes == nullptr || size <= 0) return kCopyNoBytes;
  src->nbytes = static_cast<size_t>(size);
  anemll::coreml_copy::Plan plan;
  if (!anemll::coreml_copy::plan(*src, o->dst, o->what.c_str(), &plan, err, err_size)) return kCopyRefused;
  anemll::coreml_copy::run(plan, bytes, dst);
  return kCopied;
}

// Copies an MLMultiArray Core ML allocated itself, honouring its dataType and
// strides (read into a fixed-size layout: nothing is allocated on our side).
int copy_from_array(Ctx* c, const Output& o, MLMultiArray* arr) {
  anemll::coreml_copy::Layout src;
  src.dtype = anemll_of(arr.dataType);
  if (!src.dtype)
    return set_error(c, ANEMLL_ERR_PREDICT, o.what + " came back as " + ml_dtype_text(arr.dataType) +
                                                ", which this backend cannot read");
  NSArray<NSNumber*>* shape = arr.shape;
  NSArray<NSNumber*>* strides = arr.strides;
  if (shape.count != strides.count || shape.count > ANEMLL_MAX_RANK)
    return set_error_noalloc(c, ANEMLL_ERR_PREDICT, o.what.c_str(), ": the returned array's rank is not supported");
  src.rank = static_cast<int32_t>(shape.count);
  for (int32_t k = 0; k < src.rank; ++k) {
    src.shape[k] = [shape objectAtIndex:static_cast<NSUInteger>(k)].longLongValue;
    src.strides[k] = [strides objectAtIndex:static_cast<NSUInteger>(k)].longLongValue;
  }
  void* dst = o.data;
  if (o.shared) {  // engine memory that is a pixel buffer: writable only while locked
    if (CVPixelBufferLockBaseAddress(o.shared, kLockReadWrite) != kCVReturnSuccess)
      return set_error_noalloc(c, ANEMLL_ERR_PREDICT, o.what.c_str(), ": cannot lock the pixel buffer it writes");
    dst = CVPixelBufferGetBaseAddress(o.shared);
  }
  __block int status = kCopyNotCalled;
  anemll::coreml_copy::Layout* src_p = &src;
  const Output* o_p = &o;
  char* err = c->err;
  const size_t err_size = sizeof c->err;
  if (dst != nullptr)
    [arr getBytesWithHandler:^(const void* bytes, NSInteger size) {
      status = copy_bytes(bytes, size, src_p, o_p, dst, err, err_size);
    }];
  if (o.shared) CVPixelBufferUnlockBaseAddress(o.shared, kLockReadWrite);
  switch (status) {
    case kCopied: return ANEMLL_OK;
    case kCopyRefused: return ANEMLL_ERR_PREDICT;  // the message is in c->err
    case kCopyNoBytes: return set_error_noalloc(c, ANEMLL_ERR_PREDICT, o.what.c_str(), ": no data");
    default: return set_error_noalloc(c, ANEMLL_ERR_PREDICT, o.what.c_str(), ": the array gave no bytes");
  }
}

int predict_impl(Ctx* c, anemll_binding* bh, anemll_state* sh) {
  Binding* b = binding_of(c, bh, "predict");
  if (!b) return ANEMLL_ERR_INVALID;
  const Model& m = *b->model;
  State* s = nullptr;
  if (sh) {
    s = state_of(c, sh, "predict");
    if (!s) return ANEMLL_ERR_INVALID;
  }
  const bool stateful = !m.state_key.empty();
  if (stateful) {
    if (!s)
      return set_error(c, ANEMLL_ERR_INVALID, m.label + ": the model declares states (" + m.state_key +
                                                  "); predict needs the state from make_state");
    // One state object may serve several models only when every state matches.
    if (s->key != m.state_key)
      return set_error(c, ANEMLL_ERR_INVALID, m.label + ": the state made by " + s->maker_label + " (" + s->key +
                                                  ") differs from this model's (" + m.state_key + ")");
  }

  NSError* error = nil;
  id<MLFeatureProvider> result = nil;
  auto run = [&](MLPredictionOptions* options) -> id<MLFeatureProvider> {
    error = nil;
    if (stateful) {
#if ANEMLL_HAVE_MLSTATE_API
      if (@available(macOS 15.0, *)) {
        return [b->ml predictionFromFeatures:b->features usingState:(MLState*)s->state options:options error:&error];
      }
#endif
      return nil;  // unreachable: states are only made on macOS 15+, by a build with its SDK
    }
    return [b->ml predictionFromFeatures:b->features options:options error:&error];
  };
  bool with_backings = b->use_backings;
  result = run(with_backings ? b->options : b->plain_options);
  if (result == nil && with_backings) {
    // Core ML may refuse a backing (the documentation leaves which ones to the
    // engine it picks). Run once more without; only after several refusals in
    // a row does this binding give backings up (a one-off failure does not).
    // Rerunning is harmless for ANEMLL models, whose state update at a given
    // position is idempotent.
    const std::string first = describe(error);
    result = run(b->plain_options);
    if (result == nil)
      return set_error(c, ANEMLL_ERR_PREDICT, m.label + ": prediction failed: " + describe(error) +
                                                  " (with output backings: " + first + ")");
    with_backings = false;
    c->stats.backing_retries++;
    if (++b->backing_failures >= kMaxBackingFailures) {
      b->use_backings = false;
      c->stats.backing_fallbacks++;
    }
  } else if (result != nil && with_backings) {
    b->backing_failures = 0;
  }
  if (result == nil) return set_error(c, ANEMLL_ERR_PREDICT, m.label + ": prediction failed: " + describe(error));

  for (const Output& o : b->outputs) {
    MLFeatureValue* fv = [result featureValueForName:o.ns_name];
    MLMultiArray* arr = fv.multiArrayValue;
    if (arr == nil)
      return set_error(c, ANEMLL_ERR_PREDICT, m.label + ": the prediction returned no multi-array '" + o.name + "'");
    if (with_backings && arr == o.array) {  // identity: Core ML wrote into our backing
      if (o.backing == Backing::kMultiArray || o.backing == Backing::kShared) {
        c->stats.outputs_in_place++;
        continue;
      }
      if (int rc = copy_from_pixels(c, o)) return rc;
      c->stats.outputs_copied++;
      continue;
    }
    if (int rc = copy_from_array(c, o, arr)) return rc;
    c->stats.outputs_copied++;
  }
  c->stats.predictions++;
  return ANEMLL_OK;
}

// ------------------------------------------------------------------ state contents
// The body of getMutableBytesWithHandler for a state copy: a dense row-major
// buffer to or from Core ML's view of the state (which may be padded: its own
// strides are honoured). noexcept: it runs inside Core ML's frames.
[[maybe_unused]] bool state_copy_bytes(void* bytes, NSInteger size, anemll::coreml_copy::Layout* view,
                                       const anemll::coreml_copy::Layout* dense, void* dense_data, bool to_state,
                                       const char* what, char* err, size_t err_size) noexcept {
  if (bytes == nullptr || size <= 0) return false;
  view->nbytes = static_cast<size_t>(size);
  return to_state ? anemll::coreml_copy::copy(*dense, dense_data, *view, bytes, what, err, err_size)
                  : anemll::coreml_copy::copy(*view, bytes, *dense, dense_data, what, err, err_size);
}

// Copies state `name` out of (write == 0) or into (write != 0) a dense row-major
// buffer of the caller's, through the mutable view reset_state uses.
int state_copy_impl(Ctx* c, anemll_state* sh, const char* name, void* data, size_t nbytes, int32_t dtype,
                    const int64_t* shape, int32_t rank, int write) {
  const char* what = write ? "write_state" : "read_state";
  State* s = state_of(c, sh, what);
  if (!s) return ANEMLL_ERR_INVALID;
  if (!name || !data || !shape || rank < 0 || rank > ANEMLL_MAX_RANK)
    return set_error(c, ANEMLL_ERR_INVALID, std::string(what) + ": bad arguments");
  const std::string n = name;
  if (std::find(s->names.begin(), s->names.end(), n) == s->names.end()) {
    std::string all;
    for (const std::string& k : s->names) all += (all.empty() ? "" : ", ") + k;
    return set_error(c, ANEMLL_ERR_INVALID, s->maker_label + ": no state named '" + n + "' (states: " + all + ")");
  }
#if ANEMLL_HAVE_MLSTATE_API
  if (@available(macOS 15.0, *)) {
    int64_t dense_strides[ANEMLL_MAX_RANK] = {};
    int64_t step = 1;
    for (int32_t k = rank; k-- > 0;) {
      dense_strides[k] = step;
      step *= shape[k];
    }
    anemll::coreml_copy::Layout dense;
    anemll::coreml_copy::make_layout(dtype, shape, dense_strides, rank, nbytes, &dense);  // rank checked above
    const std::string label = s->maker_label + ": state '" + n + "'";
    __block bool seen = false;
    __block bool ok = false;
    const anemll::coreml_copy::Layout* dense_p = &dense;
    const char* label_c = label.c_str();
    char* err = c->err;
    const size_t err_size = sizeof c->err;
    const bool to_state = write != 0;
    [(MLState*)s->state getMultiArrayForStateNamed:ns(n)
                                           handler:^(MLMultiArray* buffer) {
                                             __block anemll::coreml_copy::Layout view;
                                             view.dtype = anemll_of(buffer.dataType);
                                             NSArray<NSNumber*>* dims = buffer.shape;
                                             if (view.dtype == 0 || dims.count > ANEMLL_MAX_RANK) return;
                                             view.rank = static_cast<int32_t>(dims.count);
                                             for (int32_t k = 0; k < view.rank; ++k)
                                               view.shape[k] = [dims objectAtIndex:static_cast<NSUInteger>(k)].longLongValue;
                                             [buffer getMutableBytesWithHandler:^(void* bytes, NSInteger size,
                                                                                  NSArray<NSNumber*>* strides) {
                                               seen = true;
                                               if (strides.count != dims.count) return;
                                               for (int32_t k = 0; k < view.rank; ++k)
                                                 view.strides[k] = [strides objectAtIndex:static_cast<NSUInteger>(k)].longLongValue;
                                               ok = state_copy_bytes(bytes, size, &view, dense_p, data, to_state, label_c, err,
                                                                     err_size);
                                             }];
                                           }];
    if (!seen) return set_error(c, ANEMLL_ERR_PREDICT, label + ": Core ML lent no buffer for it");
    if (!ok) return c->err[0] ? ANEMLL_ERR_INVALID : set_error(c, ANEMLL_ERR_INVALID, label + ": unreadable buffer");
    return ANEMLL_OK;
  } else {
    return set_error(c, ANEMLL_ERR_UNSUPPORTED, std::string(what) + ": states need macOS 15; this is " + os_version());
  }
#else
  (void)data;
  (void)nbytes;
  (void)dtype;
  (void)write;
  return set_error(c, ANEMLL_ERR_UNSUPPORTED, std::string(what) + ": a stateful model " + kNeedsMacOS15SDK);
#endif
}

// ------------------------------------------------------------------ ABI shims
int cm_load(void* ctx, const char* path, const char* fn, anemll_model** out) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "load", ANEMLL_ERR_LOAD, [&] { return load_impl(c, path, fn, out); });
}

int cm_make_state(void* ctx, anemll_model* model, anemll_state** out) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "make_state", ANEMLL_ERR_PREDICT, [&] { return make_state_impl(c, model, out); });
}

int cm_reset_state(void* ctx, anemll_state* state) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "reset_state", ANEMLL_ERR_PREDICT, [&] { return reset_state_impl(c, state); });
}

int cm_copy_state(void* ctx, anemll_state* src, anemll_state* dst) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "copy_state", ANEMLL_ERR_PREDICT, [&] { return copy_state_impl(c, src, dst); });
}

int cm_read_state(void* ctx, anemll_state* state, const char* name, void* dst, size_t nbytes) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "read_state", ANEMLL_ERR_PREDICT,
                 [&] { return state_io_impl(c, state, name, dst, nbytes, false); });
}

int cm_write_state(void* ctx, anemll_state* state, const char* name, const void* src, size_t nbytes) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "write_state", ANEMLL_ERR_PREDICT,
                 [&] { return state_io_impl(c, state, name, const_cast<void*>(src), nbytes, true); });
}

int cm_bind(void* ctx, anemll_model* model, const anemll_tensor* in, int32_t n_in, const anemll_tensor* out_t,
            int32_t n_out, anemll_binding** out) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "bind", ANEMLL_ERR_INVALID, [&] { return bind_impl(c, model, in, n_in, out_t, n_out, out); });
}

int cm_predict(void* ctx, anemll_binding* binding, anemll_state* state) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "predict", ANEMLL_ERR_PREDICT, [&] { return predict_impl(c, binding, state); });
}

template <class T>
void release_handle(void* ctx, T* h, uint32_t magic) {
  Ctx* c = as_ctx(ctx);
  if (!h || h->magic != magic) return;
  guarded(c, "free", ANEMLL_ERR_INVALID, [&] {
    h->magic = 0;
    delete h;  // ARC releases the Objective-C members here, inside the pool
    return ANEMLL_OK;
  });
}

// alloc_buffer: fp16 tensors get an IOSurface-backed pixel buffer when the
// Neural Engine may run (pixel backings in use); others stay engine memory.
int alloc_buffer_impl(Ctx* c, anemll_tensor* t, anemll_buffer** out) {
  if (!t || !out) return set_error(c, ANEMLL_ERR_INVALID, "alloc_buffer: NULL argument");
  *out = nullptr;
  const int32_t mode = c->opts.output_backing;
  const bool pixels_wanted = mode == ANEMLL_COREML_BACKING_PIXEL_BUFFER ||
                             (mode == ANEMLL_COREML_BACKING_AUTO && ane_may_run(c->units));
  if (!pixels_wanted || t->dtype != ANEMLL_DTYPE_FLOAT16 || t->rank < 1 || t->rank > ANEMLL_MAX_RANK) return ANEMLL_OK;
  const std::vector<int64_t> shape(t->shape, t->shape + t->rank);
  int64_t width, height;
  if (!pixel_geometry(shape, &width, &height)) return ANEMLL_OK;
  std::unique_ptr<SharedBuffer> sb(new SharedBuffer());
  sb->pixels = create_pixels(width, height);
  if (sb->pixels == nullptr || shared_view(sb.get(), t->shape, t->rank) == nil) return ANEMLL_OK;  // decline
  const size_t bpr = CVPixelBufferGetBytesPerRow(sb->pixels);
  if (bpr % 2 != 0 || CVPixelBufferLockBaseAddress(sb->pixels, kLockReadWrite) != kCVReturnSuccess) return ANEMLL_OK;
  sb->key = CVPixelBufferGetBaseAddress(sb->pixels);
  if (sb->key) std::memset(sb->key, 0, bpr * static_cast<size_t>(height));
  CVPixelBufferUnlockBaseAddress(sb->pixels, kLockReadWrite);
  if (!sb->key) return ANEMLL_OK;
  t->strides[t->rank - 1] = 1;
  if (t->rank >= 2) {
    t->strides[t->rank - 2] = static_cast<int64_t>(bpr / 2);
    for (int32_t k = t->rank - 2; k-- > 0;) t->strides[k] = t->strides[k + 1] * t->shape[k + 1];
  }
  t->data = sb->key;
  t->nbytes = bpr * static_cast<size_t>(height);
  c->buffers.push_back(sb.get());
  *out = reinterpret_cast<anemll_buffer*>(sb.release());
  return ANEMLL_OK;
}

int cm_alloc_buffer(void* ctx, anemll_tensor* t, anemll_buffer** out) {
  Ctx* c = as_ctx(ctx);
  return guarded(c, "alloc_buffer", ANEMLL_ERR_INVALID, [&] { return alloc_buffer_impl(c, t, out); });
}

// Called around every host read of the logits: Core Video calls only, no
// allocation. Read-write: the sampler may write and restore entries.
int cm_map_buffer(void* ctx, anemll_buffer* b, void** data) {
  Ctx* c = as_ctx(ctx);
  auto* sb = reinterpret_cast<SharedBuffer*>(b);
  if (!c || !sb || sb->magic != kBufferMagic || !data) return ANEMLL_ERR_INVALID;
  if (CVPixelBufferLockBaseAddress(sb->pixels, kLockReadWrite) != kCVReturnSuccess)
    return set_error_noalloc(c, ANEMLL_ERR_PREDICT, "map_buffer: cannot lock the pixel buffer");
  *data = CVPixelBufferGetBaseAddress(sb->pixels);
  if (*data == nullptr) {
    CVPixelBufferUnlockBaseAddress(sb->pixels, kLockReadWrite);
    return set_error_noalloc(c, ANEMLL_ERR_PREDICT, "map_buffer: the pixel buffer has no base address");
  }
  return ANEMLL_OK;
}

void cm_unmap_buffer(void*, anemll_buffer* b) {
  auto* sb = reinterpret_cast<SharedBuffer*>(b);
  if (sb && sb->magic == kBufferMagic) CVPixelBufferUnlockBaseAddress(sb->pixels, kLockReadWrite);
}

void cm_free_buffer(void* ctx, anemll_buffer* b) {
  Ctx* c = as_ctx(ctx);
  auto* sb = reinterpret_cast<SharedBuffer*>(b);
  if (!c || !sb || sb->magic != kBufferMagic) return;
  c->buffers.erase(std::remove(c->buffers.begin(), c->buffers.end(), sb), c->buffers.end());
  guarded(c, "free_buffer", ANEMLL_ERR_INVALID, [&] {
    sb->magic = 0;
    delete sb;  // ARC releases the arrays here, inside the pool
    return ANEMLL_OK;
  });
}

void cm_free_binding(void* ctx, anemll_binding* b) {
  release_handle(ctx, reinterpret_cast<Binding*>(b), kBindingMagic);
}
void cm_free_state(void* ctx, anemll_state* s) { release_handle(ctx, reinterpret_cast<State*>(s), kStateMagic); }
void cm_free_model(void* ctx, anemll_model* m) { release_handle(ctx, reinterpret_cast<Model*>(m), kModelMagic); }
const char* cm_last_error(void* ctx) { return ctx ? as_ctx(ctx)->err : "coreml backend: no context"; }
void cm_destroy(void* ctx) { delete as_ctx(ctx); }

void write_err(char* err, size_t size, const std::string& msg) {
  if (err && size) std::snprintf(err, size, "%s", msg.c_str());
}

// guarded() for the entry points that return a pointer and report into the
// caller's buffer: NULL and a message on any exception, the pool outermost.
template <class T, class F>
T* guarded_ptr(char* err, size_t err_size, const char* what, F&& body) {
  @autoreleasepool {
    try {
      @try {
        return body();
      } @catch (NSException* e) {
        write_err(err, err_size, std::string(what) + ": Objective-C exception " + str(e.name) + ": " + str(e.reason));
        return nullptr;
      } @catch (id e) {
        write_err(err, err_size, std::string(what) + ": unknown Objective-C exception");
        return nullptr;
      }
    } catch (...) {
      if (err && err_size) std::snprintf(err, err_size, "%s: out of memory or internal error", what);
      return nullptr;
    }
  }
}

// -------------------------------------------------------------- compute plan
// Devices in report order; "unassigned" ops have no device usage (constants).
enum PlanDevice { kNeuralEngine = 0, kGPU, kCPU, kUnassigned, kPlanDevices };
const char* const kPlanDeviceNames[kPlanDevices] = {"neural_engine", "gpu", "cpu", "unassigned"};

struct PlanTally {
  uint64_t ops[kPlanDevices] = {};
  double cost[kPlanDevices] = {};
};

[[maybe_unused]] std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

[[maybe_unused]] std::string tally_json(const PlanTally& t) {
  std::string out = "{\"ops\": {";
  for (int d = 0; d < kPlanDevices; ++d)
    out += std::string(d ? ", " : "") + "\"" + kPlanDeviceNames[d] + "\": " + std::to_string(t.ops[d]);
  out += "}, \"cost\": {";
  for (int d = 0; d < kPlanDevices; ++d) {
    char num[48];
    std::snprintf(num, sizeof num, "%.9g", t.cost[d]);
    out += std::string(d ? ", " : "") + "\"" + kPlanDeviceNames[d] + "\": " + num;
  }
  return out + "}}";
}

#if ANEMLL_HAVE_COMPUTE_PLAN_API
API_AVAILABLE(macos(14.4))
PlanDevice device_of(id<MLComputeDeviceProtocol> device) {
  if (device == nil) return kUnassigned;
  if ([device isKindOfClass:[MLNeuralEngineComputeDevice class]]) return kNeuralEngine;
  if ([device isKindOfClass:[MLGPUComputeDevice class]]) return kGPU;
  if ([device isKindOfClass:[MLCPUComputeDevice class]]) return kCPU;
  return kUnassigned;
}

// Every operation of a block, nested blocks (loops, conditions) included.
API_AVAILABLE(macos(14.4))
void tally_block(MLComputePlan* plan, MLModelStructureProgramBlock* block, PlanTally* t, int depth) {
  if (block == nil || depth > 64) return;
  NSArray<MLModelStructureProgramOperation*>* ops = block.operations;
  for (NSUInteger i = 0; i < ops.count; ++i) {
    MLModelStructureProgramOperation* op = [ops objectAtIndex:i];
    MLComputePlanDeviceUsage* usage = [plan computeDeviceUsageForMLProgramOperation:op];
    const PlanDevice d = usage == nil ? kUnassigned : device_of(usage.preferredComputeDevice);
    t->ops[d]++;
    MLComputePlanCost* cost = [plan estimatedCostOfMLProgramOperation:op];
    if (cost != nil) t->cost[d] += cost.weight;
    NSArray<MLModelStructureProgramBlock*>* nested = op.blocks;
    for (NSUInteger k = 0; k < nested.count; ++k) tally_block(plan, [nested objectAtIndex:k], t, depth + 1);
  }
}

// {"functions": {name: {"ops": {...}, "cost": {...}}}} for one compiled model.
API_AVAILABLE(macos(14.4))
int compute_plan_json(Ctx* c, const std::string& path, const std::string& fn, std::string* out) {
  std::string compiled;
  if (int rc = resolve_compiled(c, path, &compiled)) return rc;
  MLModelConfiguration* config = [[MLModelConfiguration alloc] init];
  config.computeUnits = c->units;
  __block MLComputePlan* plan = nil;
  __block NSError* plan_error = nil;
  dispatch_semaphore_t done = dispatch_semaphore_create(0);
  [MLComputePlan loadContentsOfURL:[NSURL fileURLWithPath:ns(compiled) isDirectory:YES]
                     configuration:config
                 completionHandler:^(MLComputePlan* got, NSError* e) {
                   plan = got;  // plain assignments: nothing here can throw
                   plan_error = e;
                   dispatch_semaphore_signal(done);
                 }];
  if (!wait_for(done, 1800)) return set_error(c, ANEMLL_ERR_LOAD, path + ": Core ML gave no compute plan within 30 minutes");
  if (plan == nil) return set_error(c, ANEMLL_ERR_LOAD, path + ": Core ML cannot make its compute plan: " + describe(plan_error));
  MLModelStructureProgram* program = plan.modelStructure.program;
  if (program == nil) return set_error(c, ANEMLL_ERR_UNSUPPORTED, path + ": not an ML program (no per-operation plan)");
  NSDictionary<NSString*, MLModelStructureProgramFunction*>* functions = program.functions;
  std::vector<std::string> names;
  NSArray<NSString*>* keys = functions.allKeys;
  for (NSUInteger i = 0; i < keys.count; ++i) names.push_back(str([keys objectAtIndex:i]));
  std::sort(names.begin(), names.end());
  if (!fn.empty() && std::find(names.begin(), names.end(), fn) == names.end()) {
    std::string all;
    for (const std::string& n : names) all += (all.empty() ? "" : ", ") + n;
    return set_error(c, ANEMLL_ERR_INVALID, path + ": no function '" + fn + "' (functions: " + all + ")");
  }
  std::string json = "{\"functions\": {";
  bool first = true;
  for (const std::string& name : names) {
    if (!fn.empty() && name != fn) continue;
    PlanTally t;
    tally_block(plan, [functions objectForKey:ns(name)].block, &t, 0);
    json += std::string(first ? "" : ", ") + json_string(name) + ": " + tally_json(t);
    first = false;
  }
  *out = json + "}}";
  return ANEMLL_OK;
}
#endif

}  // namespace

extern "C" void anemll_coreml_options_init(anemll_coreml_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
  o->compute_units = ANEMLL_COREML_CPU_AND_NE;  // as ANEMLL (ModelLoader.swift, chat.py)
  o->output_backing = ANEMLL_COREML_BACKING_AUTO;
  o->cache_dir = nullptr;
}

extern "C" anemll_backend* anemll_coreml_backend_create(const anemll_coreml_options* options, char* err,
                                                        size_t err_size) {
  return guarded_ptr<anemll_backend>(err, err_size, "coreml backend", [&]() -> anemll_backend* {
    anemll_coreml_options o;
    anemll_coreml_options_init(&o);
    if (options) {
      if (options->struct_size < sizeof(anemll_coreml_options)) {
        write_err(err, err_size, "coreml backend: options.struct_size " + std::to_string(options->struct_size) +
                                     " is smaller than this build's " + std::to_string(sizeof(anemll_coreml_options)));
        return nullptr;
      }
      o = *options;
    }
    if (o.compute_units < ANEMLL_COREML_CPU_ONLY || o.compute_units > ANEMLL_COREML_CPU_AND_NE) {
      write_err(err, err_size, "coreml backend: compute_units " + std::to_string(o.compute_units) +
                                   " is not one of cpu_only (0), cpu_and_gpu (1), all (2), cpu_and_ne (3)");
      return nullptr;
    }
    if (o.output_backing < ANEMLL_COREML_BACKING_AUTO || o.output_backing > ANEMLL_COREML_BACKING_NONE) {
      write_err(err, err_size, "coreml backend: output_backing " + std::to_string(o.output_backing) +
                                   " is not one of auto (0), multiarray (1), pixel_buffer (2), none (3)");
      return nullptr;
    }
    if (@available(macOS 13.0, *)) {
      auto* c = new Ctx();
      c->opts = o;
      c->cache_dir = o.cache_dir ? o.cache_dir : "";
      c->opts.cache_dir = nullptr;  // the caller's string is not kept
      c->units = static_cast<MLComputeUnits>(o.compute_units);
      c->err[0] = '\0';
      auto* b = new anemll_backend();
      b->abi_version = ANEMLL_BACKEND_ABI_VERSION;
      b->struct_size = sizeof(anemll_backend);
      b->name = kBackendName;
      b->ctx = c;
      b->load = cm_load;
      b->make_state = cm_make_state;
      b->reset_state = cm_reset_state;
      b->bind = cm_bind;
      b->predict = cm_predict;
      b->free_binding = cm_free_binding;
      b->free_state = cm_free_state;
      b->free_model = cm_free_model;
      b->last_error = cm_last_error;
      b->destroy = cm_destroy;
      b->alloc_buffer = cm_alloc_buffer;
      b->map_buffer = cm_map_buffer;
      b->unmap_buffer = cm_unmap_buffer;
      b->free_buffer = cm_free_buffer;
      b->copy_state = cm_copy_state;
      b->read_state = cm_read_state;
      b->write_state = cm_write_state;
      return b;
    } else {
      write_err(err, err_size, "coreml backend: needs macOS 13 or newer (macOS 15 for stateful models); this is " +
                                   os_version());
      return nullptr;
    }
  });
}

extern "C" int anemll_coreml_backend_stats(const anemll_backend* backend, anemll_coreml_stats* out) {
  if (!backend || !out || backend->name != kBackendName || backend->destroy != cm_destroy || !backend->ctx)
    return ANEMLL_ERR_INVALID;
  *out = as_ctx(backend->ctx)->stats;
  return ANEMLL_OK;
}

extern "C" char* anemll_coreml_compute_plan(const char* path, const char* function_name, int32_t compute_units,
                                           const char* cache_dir, char* err, size_t err_size) {
  if (!path || !*path) {
    write_err(err, err_size, "compute plan: empty model path");
    return nullptr;
  }
  if (compute_units < ANEMLL_COREML_CPU_ONLY || compute_units > ANEMLL_COREML_CPU_AND_NE) {
    write_err(err, err_size, "compute plan: compute_units " + std::to_string(compute_units) + " is not one of 0..3");
    return nullptr;
  }
  return guarded_ptr<char>(err, err_size, "compute plan", [&]() -> char* {
#if ANEMLL_HAVE_COMPUTE_PLAN_API
    if (@available(macOS 14.4, *)) {
      std::unique_ptr<Ctx> c(new Ctx());
      c->err[0] = '\0';
      c->cache_dir = cache_dir ? cache_dir : "";
      c->units = static_cast<MLComputeUnits>(compute_units);
      std::string json;
      if (compute_plan_json(c.get(), path, function_name ? function_name : "", &json) != ANEMLL_OK) {
        write_err(err, err_size, std::string("compute plan: ") + c->err);
        return nullptr;
      }
      char* out = static_cast<char*>(std::malloc(json.size() + 1));
      if (!out) {
        write_err(err, err_size, "compute plan: out of memory");
        return nullptr;
      }
      std::memcpy(out, json.c_str(), json.size() + 1);
      return out;
    } else {
      write_err(err, err_size, "compute plan: MLComputePlan needs macOS 14.4 or newer; this is " + os_version());
      return nullptr;
    }
#else
    (void)function_name;
    (void)cache_dir;
    write_err(err, err_size,
              "compute plan: needs MLComputePlan (macOS 14.4), and this build of anemll_fast was compiled with an "
              "older SDK: rebuild it with Xcode 15.3 or newer");
    return nullptr;
#endif
  });
}

extern "C" int anemll_coreml_state_copy(const anemll_backend* backend, anemll_state* state, const char* name,
                                        void* data, size_t nbytes, int32_t dtype, const int64_t* shape,
                                        int32_t rank, int write, char* err, size_t err_size) {
  if (!backend || backend->name != kBackendName || backend->destroy != cm_destroy || !backend->ctx) {
    write_err(err, err_size, "state copy: not a backend made by anemll_coreml_backend_create");
    return ANEMLL_ERR_INVALID;
  }
  Ctx* c = as_ctx(backend->ctx);
  const int rc = guarded(c, write ? "write_state" : "read_state", ANEMLL_ERR_INVALID,
                         [&] { return state_copy_impl(c, state, name, data, nbytes, dtype, shape, rank, write); });
  if (rc != ANEMLL_OK) write_err(err, err_size, c->err);
  return rc;
}
