# Included by _kernels.pyx: the fused element-wise kernels of csrc/kernels/chain_kernels.h.
# Operands are float32 arrays holding the chain's inputs; shapes are checked here, so that a caller
# whose operands do not fit gets a ValueError (the plan then runs the chain op by op).

cdef extern from "kernels/chain_kernels.h" namespace "anemll::kernels" nogil:
    int c_mirror_norm "anemll::kernels::mirror_norm"(const float* x, int64_t rows, int64_t h,
                                                     const float* gamma, const float* beta, float eps,
                                                     bint round16, float* out)
    int c_rotary "anemll::kernels::rotary"(const float* x, int64_t groups, int64_t t, int64_t d,
                                           const float* cos, const float* sin, bint round16, float* out,
                                           bint x_transposed)
    int c_attention "anemll::kernels::attention"(const float* q, int64_t groups, int64_t rows, int64_t d,
                                                 const float* k, const float* v, int64_t kv_group_stride,
                                                 int64_t n_keys, const float* mask, int64_t mask_rows,
                                                 int64_t mask_stride, bint round16, float* out)
    int c_silu_gate "anemll::kernels::silu_gate"(const float* a, const float* t, const float* b, int64_t n,
                                                 bint round16, float* out)
    int c_add "anemll::kernels::add"(const float* x, const float* y, int64_t batch, int64_t rows, int64_t cols,
                                     bint y_transposed, bint round16, float* out)
    int64_t c_open_columns "anemll::kernels::open_columns"(const float* mask, int64_t rows, int64_t cols)
    const char* c_chain_isa "anemll::kernels::chain_isa"()

cimport cython


def chain_isa() -> str:
    """Which vector path the element-wise kernels run on this CPU."""
    return c_chain_isa().decode()


cdef inline float* _f32p(object a, str what) except NULL:
    """The data of a C-contiguous float32 ndarray (a ValueError for anything else)."""
    if type(a) is not np.ndarray or not cnp.PyArray_IS_C_CONTIGUOUS(a) or \
            cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32:
        raise ValueError(f"{what} must be a C-contiguous float32 array")
    return <float*>cnp.PyArray_DATA(a)


@cython.wraparound(True)
def mirror_norm(x, gamma, beta, float eps, bint round16):
    """ANEMLL's RMSNorm: layer_norm over concat([x, -x], -1) (gamma/beta of 2h values or None), first
    h outputs kept; x [..., h] C-contiguous float32. Returns a new array of x's shape."""
    cdef const float* xp = _f32p(x, "x")
    cdef int64_t h = x.shape[-1] if x.ndim else 0
    if h == 0:
        raise ValueError("mirror_norm needs a non-empty last axis")
    cdef int64_t rows = x.size // h
    cdef const float* gp = NULL
    cdef const float* bp = NULL
    if gamma is not None:
        gp = _f32p(gamma, "gamma")
        if gamma.size != 2 * h:
            raise ValueError(f"gamma of {gamma.size} values for {2 * h}")
    if beta is not None:
        bp = _f32p(beta, "beta")
        if beta.size != 2 * h:
            raise ValueError(f"beta of {beta.size} values for {2 * h}")
    out = np.empty_like(x)
    cdef float* op = <float*>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = c_mirror_norm(xp, rows, h, gp, bp, eps, round16, op)
    if rc != 0:
        raise ValueError("mirror_norm: bad arguments")
    return out


cdef inline bint _is_swapped_view(object a):
    """a (float32, ndim >= 2) is a C-contiguous array with its last two axes swapped."""
    cdef tuple sh = a.shape
    cdef tuple st = a.strides
    cdef Py_ssize_t nd = len(sh)
    cdef int64_t rows = sh[nd - 2], cols = sh[nd - 1]
    if st[nd - 2] != 4 or st[nd - 1] != 4 * rows:
        return False
    cdef int64_t step = 4 * rows * cols
    cdef Py_ssize_t i
    for i in range(nd - 3, -1, -1):
        if sh[i] != 1 and st[i] != step:
            return False
        step *= sh[i]
    return True


@cython.wraparound(True)
def rotary(x, cos, sin, bint round16):
    """x [..., t, d] with cos, sin of shape [1, ..., 1, t, d] (one table for every leading index):
    x * cos + rotate_half(x) * sin, each product and the sum rounded to fp16 when round16. x is
    C-contiguous float32, or such an array with its last two axes swapped (a transposed view, read in
    place). Returns a new C-contiguous array of x's shape."""
    cdef bint tr = False
    if type(x) is np.ndarray and cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32 and x.ndim >= 2 and \
            not cnp.PyArray_IS_C_CONTIGUOUS(x) and _is_swapped_view(x):
        tr = True
    cdef const float* xp = <const float*>cnp.PyArray_DATA(x) if tr else _f32p(x, "x")
    cdef const float* cp = _f32p(cos, "cos")
    cdef const float* sp = _f32p(sin, "sin")
    cdef tuple xs = x.shape
    cdef tuple cs = cos.shape
    if len(xs) < 2 or cs != sin.shape or len(cs) > len(xs) or len(cs) < 2 or cs[-2:] != xs[-2:] or \
            cos.size != xs[-2] * xs[-1] or xs[-1] % 2:
        raise ValueError(f"rotary: tables {list(cs)}/{list(sin.shape)} do not fit x {list(xs)}")
    cdef int64_t t = xs[-2], d = xs[-1]
    cdef int64_t groups = x.size // (t * d) if t * d else 0
    out = np.empty(xs, np.float32)
    cdef float* op = <float*>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = c_rotary(xp, groups, t, d, cp, sp, round16, op, tr)
    if rc != 0:
        raise ValueError("rotary: bad arguments")
    return out


@cython.wraparound(True)
def attention(q, k, v, mask, int64_t n_keys, bint round16):
    """softmax(q k^T + mask) v over the first n_keys keys, fp16-rounded after each op when round16.

    q [..., R, D]; k, v [..., N, D] with q's leading dims; mask [1, ..., 1, Tm, N] with Tm = 1 or
    Tm dividing R (query row r reads mask row r % Tm). All C-contiguous float32. Returns [..., R, D]."""
    cdef const float* qp = _f32p(q, "q")
    cdef const float* kp = _f32p(k, "k")
    cdef const float* vp = _f32p(v, "v")
    cdef const float* mp = _f32p(mask, "mask")
    cdef tuple qs = q.shape
    cdef tuple ks = k.shape
    cdef tuple ms = mask.shape
    if len(qs) < 2 or ks != v.shape or len(ks) != len(qs) or ks[:-2] != qs[:-2] or ks[-1] != qs[-1] or \
            len(ms) < 2 or any(m != 1 for m in ms[:-2]) or ms[-1] != ks[-2] or \
            not 0 < n_keys <= ks[-2] or ms[-2] == 0 or qs[-2] % ms[-2]:
        raise ValueError(f"attention: q {list(qs)}, k {list(ks)}, v {list(v.shape)}, mask {list(ms)} "
                         f"do not fit")
    cdef int64_t rows = qs[-2], d = qs[-1], n = ks[-2]
    cdef int64_t groups = q.size // (rows * d) if rows * d else 0
    out = np.empty_like(q)
    if q.size == 0:
        return out
    cdef float* op = <float*>cnp.PyArray_DATA(out)
    cdef int64_t mrows = ms[-2], mstride = ms[-1]
    cdef int rc
    with nogil:
        rc = c_attention(qp, groups, rows, d, kp, vp, n * d, n_keys, mp, mrows, mstride, round16, op)
    if rc != 0:
        raise ValueError("attention: bad arguments")
    return out


@cython.wraparound(True)
def add(x, y, bint round16):
    """x + y rounded to fp16 when round16, for float32 arrays of one shape (no broadcasting): each
    C-contiguous, or one of them a C-contiguous array with its last two axes swapped (a transposed view).
    Returns a new C-contiguous array."""
    if type(x) is not np.ndarray or type(y) is not np.ndarray or cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32 or \
            cnp.PyArray_TYPE(y) != cnp.NPY_FLOAT32 or x.shape != y.shape:
        raise ValueError("add: operands of one shape, float32 arrays")
    cdef bint tr = False
    if not cnp.PyArray_IS_C_CONTIGUOUS(x):
        x, y = y, x  # x + y == y + x, bit for bit
    if not cnp.PyArray_IS_C_CONTIGUOUS(x):
        raise ValueError("add: neither operand is C-contiguous")
    if not cnp.PyArray_IS_C_CONTIGUOUS(y):
        if x.ndim < 2 or not _is_swapped_view(y):
            raise ValueError("add: an operand of a layout the kernel does not take")
        tr = True
    out = np.empty(x.shape, np.float32)
    cdef int64_t rows = x.shape[-2] if x.ndim >= 2 else 1
    cdef int64_t cols = x.shape[-1] if x.ndim >= 1 else 1
    cdef int64_t batch = x.size // (rows * cols) if rows * cols else 0
    cdef const float* xp = <const float*>cnp.PyArray_DATA(x)
    cdef const float* yp = <const float*>cnp.PyArray_DATA(y)
    cdef float* op = <float*>cnp.PyArray_DATA(out)
    cdef int rc
    with nogil:
        rc = c_add(xp, yp, batch, rows, cols, tr, round16, op)
    if rc != 0:
        raise ValueError("add: bad arguments")
    return out


def silu_gate(a, t, b, bint round16):
    """silu(a) * b from t = tanh(a / 2): r(r(a * (0.5 * (1 + t))) * b), r() the fp16 rounding when
    round16; a, t, b C-contiguous float32 of one shape. Written into t, which is returned."""
    cdef const float* ap = _f32p(a, "a")
    cdef float* tp = _f32p(t, "t")
    cdef const float* bp = _f32p(b, "b")
    if a.shape != t.shape or a.shape != b.shape:
        raise ValueError(f"silu_gate: shapes {list(a.shape)}, {list(t.shape)}, {list(b.shape)} differ")
    cdef int64_t n = a.size
    cdef int rc
    with nogil:
        rc = c_silu_gate(ap, tp, bp, n, round16, tp)
    if rc != 0:
        raise ValueError("silu_gate: bad arguments")
    return t


@cython.wraparound(True)
def open_columns(mask):
    """One past the last column (last axis) of a C-contiguous float32 mask that is not -inf in every row."""
    cdef const float* mp = _f32p(mask, "mask")
    if mask.ndim == 0 or mask.shape[-1] == 0:
        return 0
    cdef int64_t cols = mask.shape[-1]
    cdef int64_t rows = mask.size // cols
    cdef int64_t r
    with nogil:
        r = c_open_columns(mp, rows, cols)
    return r
