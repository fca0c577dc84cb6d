# Included by _kernels.pyx: the fused element-wise kernels of csrc/kernels/elementwise_kernels.h.
# Operands are float32 arrays holding the chain's inputs; shapes are checked here, so that a caller
# whose operands do not fit gets a ValueError (the plan then runs the chain op by op).

cdef extern from "kernels/elementwise_kernels.h" namespace "anemll::kernels" nogil:
    void c_round_f16 "anemll::kernels::round_f16"(const float* x, int64_t n, float* out)
    int c_mirror_norm "anemll::kernels::mirror_norm"(const float* x, int64_t rows, int64_t h,
                                                     const float* gamma, const float* beta, float eps,
                                                     bint round16, float* out)
    int c_rotary "anemll::kernels::rotary"(const float* x, int64_t groups, int64_t t, int64_t d,
                                           const float* cos, const float* sin, bint round16, float* out)
    const char* c_elementwise_isa "anemll::kernels::elementwise_isa"()

cimport cython


def elementwise_isa() -> str:
    """Which vector path the element-wise kernels run on this CPU."""
    return c_elementwise_isa().decode()


cdef inline object _f32c(object a, str what):
    if type(a) is not np.ndarray or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous float32 array")
    return a


def round_f16(x):
    """A new float32 array: x rounded to the nearest fp16 values (round to nearest even)."""
    xa = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(xa)
    cdef const float[::1] xv = xa.reshape(-1)
    cdef float[::1] ov = out.reshape(-1)
    cdef int64_t n = xa.size
    if n:
        with nogil:
            c_round_f16(&xv[0], n, &ov[0])
    return out


@cython.wraparound(True)
def mirror_norm(x, gamma, beta, float eps, bint round16):
    """ANEMLL's RMSNorm: layer_norm over concat([x, -x], -1) (gamma/beta of 2h values or None), first
    h outputs kept; x [..., h] C-contiguous float32. Returns a new array of x's shape."""
    _f32c(x, "x")
    cdef int64_t h = x.shape[-1] if x.ndim else 0
    if h == 0:
        raise ValueError("mirror_norm needs a non-empty last axis")
    cdef int64_t rows = x.size // h
    cdef const float* gp = NULL
    cdef const float* bp = NULL
    cdef const float[::1] gv
    cdef const float[::1] bv
    if gamma is not None:
        _f32c(gamma, "gamma")
        if gamma.size != 2 * h:
            raise ValueError(f"gamma of {gamma.size} values for {2 * h}")
        gv = gamma.reshape(-1)
        gp = &gv[0]
    if beta is not None:
        _f32c(beta, "beta")
        if beta.size != 2 * h:
            raise ValueError(f"beta of {beta.size} values for {2 * h}")
        bv = beta.reshape(-1)
        bp = &bv[0]
    out = np.empty_like(x)
    if rows == 0:
        return out
    cdef const float[::1] xv = x.reshape(-1)
    cdef float[::1] ov = out.reshape(-1)
    cdef int rc
    with nogil:
        rc = c_mirror_norm(&xv[0], rows, h, gp, bp, eps, round16, &ov[0])
    if rc != 0:
        raise ValueError("mirror_norm: bad arguments")
    return out


@cython.wraparound(True)
def rotary(x, cos, sin, bint round16):
    """x [..., t, d] with cos, sin of shape [1, ..., 1, t, d] (one table for every leading index):
    x * cos + rotate_half(x) * sin, each product and the sum rounded to fp16 when round16."""
    _f32c(x, "x")
    _f32c(cos, "cos")
    _f32c(sin, "sin")
    if x.ndim < 2 or cos.shape != sin.shape or cos.ndim > x.ndim or cos.ndim < 2 or \
            cos.shape[-2:] != x.shape[-2:] or cos.size != x.shape[-2] * x.shape[-1] or x.shape[-1] % 2:
        raise ValueError(f"rotary: tables {list(cos.shape)}/{list(sin.shape)} do not fit x {list(x.shape)}")
    cdef int64_t t = x.shape[-2], d = x.shape[-1]
    cdef int64_t groups = x.size // (t * d) if t * d else 0
    out = np.empty_like(x)
    if x.size == 0:
        return out
    cdef const float[::1] xv = x.reshape(-1)
    cdef const float[::1] cv = cos.reshape(-1)
    cdef const float[::1] sv = sin.reshape(-1)
    cdef float[::1] ov = out.reshape(-1)
    cdef int rc
    with nogil:
        rc = c_rotary(&xv[0], groups, t, d, &cv[0], &sv[0], round16, &ov[0])
    if rc != 0:
        raise ValueError("rotary: bad arguments")
    return out
