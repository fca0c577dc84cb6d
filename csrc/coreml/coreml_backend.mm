// The Core ML backend: the engine ABI (backends/backend_abi.h) over MLModel.
//
// Built on macOS only (setup.py adds csrc/**/*.mm there); type-checked on Linux
// against sdk_decls/apple_sdk_decls.h by tests/test_coreml_syntax.py.
//
// What happens where:
//   load        .mlmodelc loaded directly; .mlpackage/.mlmodel compiled once
//               into a content-addressed cache (package_cache.h). computeUnits
//               and, on macOS 15+, functionName from the configuration.
//   make_state  -[MLModel newState]; the state remembers its spec (every state's
//               name, dtype and shape from stateDescriptionsByName) and predict
//               refuses it on a model whose spec differs.
//   reset_state zeroes every state buffer in place (see reset_state_impl).
//   bind        one MLMultiArray per input over the engine's own memory
//               (initWithDataPointer, no copy), one MLDictionaryFeatureProvider
//               reused for every prediction, and output backings: an
//               MLMultiArray over the engine's buffer, or an IOSurface-backed
//               fp16 CVPixelBuffer where the Neural Engine runs the model.
//   predict     @autoreleasepool, stateful or stateless prediction; outputs are
//               left in place when Core ML used the engine's buffer (checked by
//               identity), else copied once honouring the returned array's own
//               dataType and strides.
// Every entry point catches Objective-C and C++ exceptions; nothing escapes.
#define ANEMLL_COREML_IMPLEMENTATION 1
#include "coreml/coreml_backend.h"

#if defined(ANEMLL_COREML_SDK_DECLS)
#include "coreml/sdk_decls/apple_sdk_decls.h"
#else
#import <CoreML/CoreML.h>
#import <CoreVideo/CoreVideo.h>
#import <Foundation/Foundation.h>
#endif

#include <algorithm>
#include <cctype>
#include <cstdio>
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

// ------------------------------------------------------------------ handles
struct Ctx {
  anemll_coreml_options opts{};
  std::string cache_dir;  // "" = default root
  MLComputeUnits units = MLComputeUnitsAll;
  anemll_coreml_stats stats{};
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
  id state = nil;      // MLState (macOS 15+); typed `id` so that no declaration needs a guard
  MLModel* maker = nil;  // re-creates the state if an in-place reset is impossible
  std::string key, maker_label;
  std::vector<std::string> names;
};

enum class Backing { kNone, kMultiArray, kPixelBuffer };

struct Output {
  std::string name;
  NSString* ns_name = nil;
  int32_t dtype = 0;  // engine dtype
  std::vector<int64_t> shape, strides;
  void* data = nullptr;
  size_t nbytes = 0;
  Backing backing = Backing::kNone;
  MLMultiArray* array = nil;          // the backing object handed to Core ML
  CVPixelBufferRef pixels = nullptr;  // our +1 reference for kPixelBuffer
};

struct Binding {
  uint32_t magic = kBindingMagic;
  Model* model = nullptr;
  MLModel* ml = nil;
  MLDictionaryFeatureProvider* features = nil;
  MLPredictionOptions* options = nil;        // with output backings when any
  MLPredictionOptions* plain_options = nil;  // without: the fallback
  bool use_backings = false;
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

std::string shape_text(NSArray<NSNumber*>* shape) {
  std::vector<int64_t> v;
  if (shape != nil)
    for (NSUInteger i = 0; i < shape.count; ++i) v.push_back([shape objectAtIndex:i].longLongValue);
  return anemll::coreml_copy::shape_str(v);
}

std::vector<int64_t> to_vec(NSArray<NSNumber*>* a) {
  std::vector<int64_t> v;
  if (a != nil)
    for (NSUInteger i = 0; i < a.count; ++i) v.push_back([a objectAtIndex:i].longLongValue);
  return v;
}

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

std::string spec_text(const std::vector<StateSpec>& states) {
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

// Runs an entry point's body with every exception caught and the autorelease
// pool drained, so that nothing crosses the C ABI.
template <class F>
int guarded(Ctx* c, const char* what, int code, F&& body) {
  if (!c) return ANEMLL_ERR_INVALID;
  try {
    @try {
      @autoreleasepool {
        c->err[0] = '\0';
        return body();
      }
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
  NSURL* tmp = [MLModel compileModelAtURL:[NSURL fileURLWithPath:ns(package) isDirectory:is_dir] error:&error];
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

// ------------------------------------------------------------------ load
int load_impl(Ctx* c, const char* path, const char* function_name, anemll_model** out) {
  if (!out) return set_error(c, ANEMLL_ERR_INVALID, "load: out is NULL");
  *out = nullptr;
  if (!path || !*path) return set_error(c, ANEMLL_ERR_INVALID, "load: empty model path");
  const std::string p = path;
  const std::string fn = function_name ? function_name : "";
  std::error_code ec;
  if (!fs::exists(p, ec)) return set_error(c, ANEMLL_ERR_LOAD, p + ": no such file or directory");
  std::string ext = fs::path(p).has_filename() ? fs::path(p).extension().string()
                                               : fs::path(p).parent_path().extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  std::string compiled;
  if (ext == ".mlmodelc") {
    compiled = p;
  } else if (ext == ".mlpackage" || ext == ".mlmodel") {
    if (int rc = compiled_path(c, p, &compiled)) return rc;
  } else {
    return set_error(c, ANEMLL_ERR_LOAD, p + ": not a Core ML model (expected .mlmodelc, .mlpackage or .mlmodel)");
  }

  MLModelConfiguration* config = [[MLModelConfiguration alloc] init];
  config.computeUnits = c->units;
  if (!fn.empty()) {
    if (@available(macOS 15.0, *)) {
      config.functionName = ns(fn);
    } else {
      return set_error(c, ANEMLL_ERR_UNSUPPORTED,
                       p + ": loading function '" + fn + "' of a multifunction model needs macOS 15 "
                       "(MLModelConfiguration.functionName); this is " + os_version());
    }
  }
  NSError* error = nil;
  MLModel* ml = [MLModel modelWithContentsOfURL:[NSURL fileURLWithPath:ns(compiled) isDirectory:YES]
                                  configuration:config
                                          error:&error];
  if (ml == nil)
    return set_error(c, ANEMLL_ERR_LOAD, p + (fn.empty() ? "" : " function '" + fn + "'") +
                                             ": Core ML cannot load it: " + describe(error) + " [" + os_version() + "]");

  auto* m = new Model();
  m->model = ml;
  m->path = p;
  m->function = fn;
  m->label = fs::path(p).filename().string() + (fn.empty() ? "" : " function '" + fn + "'");
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
}

// Core ML has no "reset" for an MLState. Its documented mutable view
// (getMultiArrayForStateNamed:handler:) lets us zero every buffer in place:
// one memset, same MLState object, no reload. Should a buffer not be reachable
// that way, the state is re-created with newState (documented to start at
// zero) and swapped inside our handle, so the engine's pointer stays valid.
int reset_state_impl(Ctx* c, anemll_state* sh) {
  State* s = state_of(c, sh, "reset_state");
  if (!s) return ANEMLL_ERR_INVALID;
  if (@available(macOS 15.0, *)) {
    MLState* st = (MLState*)s->state;
    bool all = true;
    for (const std::string& name : s->names) {
      __block bool done = false;
      [st getMultiArrayForStateNamed:ns(name)
                             handler:^(MLMultiArray* buffer) {
                               [buffer getMutableBytesWithHandler:^(void* bytes, NSInteger size, NSArray<NSNumber*>* strides) {
                                 (void)strides;  // padding included: zeroing the whole allocation is right
                                 if (bytes && size > 0) std::memset(bytes, 0, static_cast<size_t>(size));
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
}

// ------------------------------------------------------------------ binding
bool ane_may_run(MLComputeUnits u) { return u == MLComputeUnitsAll || u == MLComputeUnitsCPUAndNeuralEngine; }

// An IOSurface-backed fp16 pixel buffer shaped [prod(shape[:-1]), shape[-1]]
// wrapped as an MLMultiArray; nil (and pixels NULL) when Core Video refuses.
MLMultiArray* pixel_backing(const Output& o, CVPixelBufferRef* pixels) {
  *pixels = nullptr;
  if (o.shape.empty()) return nil;
  const int64_t width = o.shape.back();
  int64_t height = 1;
  for (size_t i = 0; i + 1 < o.shape.size(); ++i) height *= o.shape[i];
  NSDictionary* surface_props = [[NSDictionary alloc] init];  // present and empty: allocate via IOSurface
  id<NSCopying> keys[1] = {(__bridge NSString*)kCVPixelBufferIOSurfacePropertiesKey};
  id values[1] = {surface_props};
  NSDictionary* attrs = [NSDictionary dictionaryWithObjects:values forKeys:keys count:1];
  CVPixelBufferRef pb = nullptr;
  const CVReturn rc = CVPixelBufferCreate(kCFAllocatorDefault, static_cast<size_t>(width), static_cast<size_t>(height),
                                          kCVPixelFormatType_OneComponent16Half, (__bridge CFDictionaryRef)attrs, &pb);
  if (rc != kCVReturnSuccess || pb == nullptr) return nil;
  MLMultiArray* arr = [[MLMultiArray alloc] initWithPixelBuffer:pb shape:to_ns(o.shape.data(), static_cast<int32_t>(o.shape.size()))];
  if (arr == nil) {
    CVPixelBufferRelease(pb);
    return nil;
  }
  *pixels = pb;
  return arr;
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
    MLMultiArray* arr = [[MLMultiArray alloc] initWithDataPointer:t.data
                                                            shape:to_ns(t.shape, t.rank)
                                                         dataType:dt
                                                          strides:to_ns(t.strides, t.rank)
                                                      deallocator:nil
                                                            error:&error];
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
    o.dtype = t.dtype;
    o.shape.assign(t.shape, t.shape + t.rank);
    o.strides.assign(t.strides, t.strides + t.rank);
    o.data = t.data;
    o.nbytes = t.nbytes;
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
      if (o.array == nil) want = Backing::kMultiArray;  // e.g. a shape Core Video cannot allocate
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
// Copies a pixel-buffer backing (rows of bytesPerRow) into the engine's buffer.
int copy_from_pixels(Ctx* c, const Binding& b, const Output& o) {
  if (CVPixelBufferLockBaseAddress(o.pixels, kCVPixelBufferLock_ReadOnly) != kCVReturnSuccess)
    return set_error(c, ANEMLL_ERR_PREDICT, b.model->label + ": output '" + o.name + "': cannot lock its pixel buffer");
  const void* base = CVPixelBufferGetBaseAddress(o.pixels);
  const size_t bpr = CVPixelBufferGetBytesPerRow(o.pixels);
  const size_t height = CVPixelBufferGetHeight(o.pixels);
  anemll::coreml_copy::Tensor src;
  src.data = base;
  src.dtype = ANEMLL_DTYPE_FLOAT16;
  src.shape = o.shape;
  src.strides.assign(o.shape.size(), 1);
  // Rows are the flattened leading dimensions, bytesPerRow apart.
  if (o.shape.size() >= 2) {
    src.strides[o.shape.size() - 2] = static_cast<int64_t>(bpr / 2);
    for (size_t k = o.shape.size() - 2; k-- > 0;) src.strides[k] = src.strides[k + 1] * o.shape[k + 1];
  }
  src.nbytes = bpr * height;
  anemll::coreml_copy::Tensor dst;
  dst.dtype = o.dtype;
  dst.shape = o.shape;
  dst.strides = o.strides;
  dst.nbytes = o.nbytes;
  std::string err;
  const bool ok = base != nullptr && bpr % 2 == 0 &&
                  anemll::coreml_copy::copy(src, dst, o.data, b.model->label + ": output '" + o.name + "'", &err);
  CVPixelBufferUnlockBaseAddress(o.pixels, kCVPixelBufferLock_ReadOnly);
  if (!ok)
    return set_error(c, ANEMLL_ERR_PREDICT,
                     err.empty() ? b.model->label + ": output '" + o.name + "': unreadable pixel buffer" : err);
  return ANEMLL_OK;
}

// Copies an MLMultiArray Core ML allocated itself, honouring its dataType and strides.
int copy_from_array(Ctx* c, const Binding& b, const Output& o, MLMultiArray* arr) {
  anemll::coreml_copy::Tensor src;
  src.dtype = anemll_of(arr.dataType);
  if (!src.dtype)
    return set_error(c, ANEMLL_ERR_PREDICT, b.model->label + ": output '" + o.name + "' came back as " +
                                                ml_dtype_text(arr.dataType) + ", which this backend cannot read");
  src.shape = to_vec(arr.shape);
  src.strides = to_vec(arr.strides);
  anemll::coreml_copy::Tensor dst;
  dst.dtype = o.dtype;
  dst.shape = o.shape;
  dst.strides = o.strides;
  dst.nbytes = o.nbytes;
  __block bool ok = false;
  __block bool seen = false;
  std::string err;
  std::string* err_p = &err;
  const std::string what = b.model->label + ": output '" + o.name + "'";
  const std::string* what_p = &what;
  anemll::coreml_copy::Tensor* src_p = &src;
  const anemll::coreml_copy::Tensor* dst_p = &dst;
  void* dst_data = o.data;
  [arr getBytesWithHandler:^(const void* bytes, NSInteger size) {
    seen = true;
    src_p->data = bytes;
    src_p->nbytes = size > 0 ? static_cast<size_t>(size) : 0;
    ok = bytes != nullptr && anemll::coreml_copy::copy(*src_p, *dst_p, dst_data, *what_p, err_p);
  }];
  if (!ok)
    return set_error(c, ANEMLL_ERR_PREDICT, !err.empty() ? err : what + (seen ? ": no data" : ": the array gave no bytes"));
  return ANEMLL_OK;
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
      if (@available(macOS 15.0, *)) {
        return [b->ml predictionFromFeatures:b->features usingState:(MLState*)s->state options:options error:&error];
      }
      return nil;  // unreachable: states only exist on macOS 15+
    }
    return [b->ml predictionFromFeatures:b->features options:options error:&error];
  };
  result = run(b->use_backings ? b->options : b->plain_options);
  if (result == nil && b->use_backings) {
    // Core ML may refuse a backing (the documentation leaves which ones to the
    // engine it picks). Run once more without and keep that for this binding;
    // rerunning is harmless for ANEMLL models, whose state update at a given
    // position is idempotent.
    const std::string first = describe(error);
    result = run(b->plain_options);
    if (result == nil)
      return set_error(c, ANEMLL_ERR_PREDICT, m.label + ": prediction failed: " + describe(error) +
                                                  " (with output backings: " + first + ")");
    b->use_backings = false;
    c->stats.backing_fallbacks++;
  }
  if (result == nil) return set_error(c, ANEMLL_ERR_PREDICT, m.label + ": prediction failed: " + describe(error));

  for (const Output& o : b->outputs) {
    MLFeatureValue* fv = [result featureValueForName:o.ns_name];
    MLMultiArray* arr = fv.multiArrayValue;
    if (arr == nil)
      return set_error(c, ANEMLL_ERR_PREDICT, m.label + ": the prediction returned no multi-array '" + o.name + "'");
    if (b->use_backings && arr == o.array) {  // identity: Core ML wrote into our backing
      if (o.backing == Backing::kMultiArray) {
        c->stats.outputs_in_place++;
        continue;
      }
      if (int rc = copy_from_pixels(c, *b, o)) return rc;
      c->stats.outputs_copied++;
      continue;
    }
    if (int rc = copy_from_array(c, *b, o, arr)) return rc;
    c->stats.outputs_copied++;
  }
  c->stats.predictions++;
  return ANEMLL_OK;
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

}  // namespace

extern "C" void anemll_coreml_options_init(anemll_coreml_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
  o->compute_units = ANEMLL_COREML_ALL;
  o->output_backing = ANEMLL_COREML_BACKING_AUTO;
  o->cache_dir = nullptr;
}

extern "C" anemll_backend* anemll_coreml_backend_create(const anemll_coreml_options* options, char* err,
                                                        size_t err_size) {
  try {
    @try {
      @autoreleasepool {
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
          return b;
        } else {
          write_err(err, err_size, "coreml backend: needs macOS 13 or newer (macOS 15 for stateful models); this is " +
                                       os_version());
          return nullptr;
        }
      }
    } @catch (NSException* e) {
      write_err(err, err_size, "coreml backend: Objective-C exception " + str(e.name) + ": " + str(e.reason));
      return nullptr;
    }
  } catch (...) {
    if (err && err_size) std::snprintf(err, err_size, "%s", "coreml backend: out of memory or internal error");
    return nullptr;
  }
}

extern "C" int anemll_coreml_backend_stats(const anemll_backend* backend, anemll_coreml_stats* out) {
  if (!backend || !out || backend->name != kBackendName || backend->destroy != cm_destroy || !backend->ctx)
    return ANEMLL_ERR_INVALID;
  *out = as_ctx(backend->ctx)->stats;
  return ANEMLL_OK;
}
