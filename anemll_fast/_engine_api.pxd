# Declarations of the C++ engine (csrc/) used by _native.pyx.
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "backends/backend_abi.h" nogil:
    enum:
        ANEMLL_BACKEND_ABI_VERSION
        ANEMLL_MAX_RANK
        ANEMLL_OK
        ANEMLL_ERR_LOAD
        ANEMLL_ERR_INVALID
        ANEMLL_ERR_PREDICT
    ctypedef struct anemll_tensor:
        const char* name
        int32_t dtype
        int32_t rank
        int64_t shape[8]
        int64_t strides[8]
        void* data
        size_t nbytes
    ctypedef struct anemll_model:
        pass
    ctypedef struct anemll_state:
        pass
    ctypedef struct anemll_binding:
        pass
    ctypedef struct anemll_backend:
        uint32_t abi_version
        const char* name
        void* ctx
        int (*load)(void* ctx, const char* path, const char* function_name, anemll_model** out) noexcept nogil
        int (*make_state)(void* ctx, anemll_model* model, anemll_state** out) noexcept nogil
        int (*reset_state)(void* ctx, anemll_state* state) noexcept nogil
        int (*bind)(void* ctx, anemll_model* model, const anemll_tensor* inputs, int32_t n_inputs,
                    const anemll_tensor* outputs, int32_t n_outputs, anemll_binding** out) noexcept nogil
        int (*predict)(void* ctx, anemll_binding* binding, anemll_state* state) noexcept nogil
        void (*free_binding)(void* ctx, anemll_binding* binding) noexcept nogil
        void (*free_state)(void* ctx, anemll_state* state) noexcept nogil
        void (*free_model)(void* ctx, anemll_model* model) noexcept nogil
        const char* (*last_error)(void* ctx) noexcept nogil
    size_t anemll_dtype_size(int32_t dtype)


cdef extern from "backends/host_buffers.h" namespace "anemll" nogil:
    cdef struct HostBuffers:
        int64_t row_pad
        uint64_t allocs
        uint64_t frees
        uint64_t maps
        uint64_t unmaps
        int64_t mapped


cdef extern from "backends/null_backend.h" namespace "anemll" nogil:
    anemll_backend* new_null_backend(int64_t buffer_row_pad)
    const HostBuffers* null_backend_buffers(const anemll_backend* backend)
    void delete_backend(anemll_backend* backend)


cdef extern from "backends/callback_backend.h" namespace "anemll" nogil:
    cdef struct CallbackHooks:
        void* user
        int (*load)(void*, const char*, const char*, int64_t*, char*, size_t) noexcept
        int (*make_state)(void*, int64_t, int64_t*, char*, size_t) noexcept
        int (*reset_state)(void*, int64_t, char*, size_t) noexcept
        int (*bind)(void*, int64_t, const anemll_tensor*, int32_t, const anemll_tensor*, int32_t,
                    int64_t*, char*, size_t) noexcept
        int (*predict)(void*, int64_t, int64_t, char*, size_t) noexcept
        int (*read_state)(void*, int64_t, const char*, void*, size_t, char*, size_t) noexcept
        int (*write_state)(void*, int64_t, const char*, const void*, size_t, char*, size_t) noexcept
        void (*release)(void*, int, int64_t) noexcept
        int (*copy_state)(void*, int64_t, int64_t, char*, size_t) noexcept
    anemll_backend* new_callback_backend(const CallbackHooks& hooks, int64_t buffer_row_pad)
    const HostBuffers* callback_backend_buffers(const anemll_backend* backend)
    int64_t callback_handle_id(const void* handle)


cdef extern from "backends/alloc_probe_backend.h" namespace "anemll" nogil:
    anemll_backend* new_alloc_probe_backend(int mode)


cdef extern from "engine/alloc_hook.h" namespace "anemll" nogil:
    void set_alloc_counting(cbool on)
    uint64_t alloc_count()
    void alloc_probe()


cdef extern from "engine/sampler.h" namespace "anemll" nogil:
    cdef struct LogitsPart:
        uint16_t* data
        int64_t size
        int64_t offset
    cdef cppclass SamplerConfig:
        float temperature
        int32_t top_k
        float top_p
        float min_p
        float repetition_penalty
        float presence_penalty
        float frequency_penalty
        int32_t penalty_window
        vector[int32_t] bias_tokens
        vector[float] bias_values
        uint64_t seed
        int32_t top_logprobs
    cdef cppclass Sampler:
        string configure(const SamplerConfig& cfg, int64_t vocab, int64_t max_history)
        void reseed(uint64_t seed)
        void set_token_mask(const uint32_t* words, int64_t n_bits)
        int sample(LogitsPart* parts, int n_parts, const int32_t* history, int64_t history_len,
                   int32_t* token)
        const char* error()
        size_t candidates()
        float chosen_logprob
        int32_t n_top
        vector[int32_t] top_ids
        vector[float] top_logprobs
    int64_t argmax_parts(const LogitsPart* parts, int n_parts)


cdef extern from "engine/engine.h" namespace "anemll" nogil:
    cdef cppclass TensorDesc:
        string name
        int32_t dtype
        vector[vector[int64_t]] shapes
    cdef cppclass ComponentDesc:
        string label
        string path
        string function
        vector[TensorDesc] inputs
        vector[TensorDesc] outputs
        vector[TensorDesc] states
    cdef cppclass ContextFunctions:
        int64_t context_length
        vector[ComponentDesc] ffn_prefill
        vector[ComponentDesc] ffn_infer
        vector[ComponentDesc] ffn_infer_rotate
    cdef cppclass PipelineDesc:
        int64_t batch_size
        int64_t context_length
        int64_t hidden_size
        int64_t vocab_size
        ComponentDesc embeddings
        vector[ComponentDesc] ffn_prefill
        vector[ComponentDesc] ffn_infer
        vector[ComponentDesc] ffn_infer_rotate
        int64_t sliding_window
        cbool monolithic
        vector[ContextFunctions] smaller_contexts
        ComponentDesc lm_head
        vector[string] logits_outputs
        vector[int64_t] part_sizes
        cbool sequential_prefill
        int64_t valid_vocab
    cdef cppclass StateTensor:
        int64_t state
        string name
        int32_t dtype
        vector[int64_t] shape
        size_t nbytes
    cdef cppclass StepTiming:
        int64_t steps
        int64_t total_ns
        int64_t embed_ns
        int64_t head_ns
        int64_t sample_ns
        vector[int64_t] chunk_ns
    int64_t monotonic_ns()
    cdef cppclass Engine:
        Engine(const anemll_backend* backend)
        void set_timing(cbool on)
        cbool timing()
        const StepTiming& timing_counters()
        void reset_timing()
        cbool can_access_states()
        int read_state(size_t i, void* dst, size_t nbytes)
        int write_state(size_t i, const void* src, size_t nbytes)
        int set_history(const int32_t* tokens, int64_t n)
        int set_active_context(int64_t ctx)
        vector[StateTensor] state_tensors()
        int init(const PipelineDesc& desc)
        int reset()
        int prefill(const int32_t* tokens, int64_t n, int64_t start)
        int replay(const int32_t* tokens, int64_t n, int64_t start)
        int step(int32_t token, int64_t pos, int32_t* next)
        int configure_sampler(const SamplerConfig& cfg)
        string sampler_rng_state()
        int set_sampler_rng_state(const string& state)
        int set_token_mask(const uint32_t* words, int64_t n_bits)
        const string& error()
        int64_t length()
        int64_t valid_vocab()
        const int32_t* history()
        const Sampler& sampler()
        cbool argmax_head()
        int n_parts()
        const LogitsPart* parts()
        int map_logits()
        void unmap_logits()
        int64_t backend_buffers()
        const string& prefill_mode()
        int64_t state_count()
        const char* infer_function(int64_t pos)
        cbool batch_prefill_at(int64_t pos)
        int64_t infer_rotate_calls
        int64_t cache_rebuilds
        int64_t context_switches
        int64_t context_at(int64_t pos)
        int64_t active_context()
        int64_t embed_calls
        int64_t prefill_calls
        int64_t infer_calls
        int64_t head_calls



cdef extern from "engine/bench.h" namespace "anemll" nogil:
    int bench_decode(Engine& engine, int32_t token, int64_t pos, int64_t n, int32_t* tokens_out, int64_t* ns_out,
                     int64_t* done)
    int bench_prefill(Engine& engine, const int32_t* tokens, int64_t n, int64_t reps, int64_t* prefill_ns,
                      int64_t* first_ns, int32_t* first_token)
    int bench_sampler(Sampler& sampler, LogitsPart* parts, int n_parts, const int32_t* history,
                      int64_t history_len, int64_t reps, int64_t* ns_out, int32_t* last_token)
    uint16_t bench_read_parts(const LogitsPart* parts, int n_parts, int64_t reps, int64_t* ns_out)


# The Core ML backend: the factory exists in macOS builds; elsewhere the header's
# inline stubs fail with a clear message.
cdef extern from "coreml/coreml_backend.h" nogil:
    ctypedef struct anemll_coreml_options:
        uint32_t struct_size
        int32_t compute_units
        int32_t output_backing
        const char* cache_dir
    ctypedef struct anemll_coreml_stats:
        uint64_t predictions
        uint64_t outputs_in_place
        uint64_t outputs_copied
        uint64_t backing_retries
        uint64_t backing_fallbacks
        uint64_t compiles
        uint64_t cache_hits
        uint64_t state_resets
    void anemll_coreml_options_init(anemll_coreml_options*)
    anemll_backend* anemll_coreml_backend_create(const anemll_coreml_options*, char*, size_t)
    int anemll_coreml_backend_stats(const anemll_backend*, anemll_coreml_stats*)
    char* anemll_coreml_compute_plan(const char*, const char*, int32_t, const char*, char*, size_t)
    int anemll_coreml_state_copy(const anemll_backend*, anemll_state*, const char*, void*, size_t, int32_t,
                                 const int64_t*, int32_t, int, char*, size_t)
