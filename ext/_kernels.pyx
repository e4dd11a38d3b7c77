# Compute kernels behind bertstream.ext. They trust their inputs: shapes, dtypes, contiguity and
# 1 <= length <= seq are checked once by the Python layer in __init__.py. Build directives
# (boundscheck, wraparound, cdivision ...) and OpenMP flags live in setup.py, in one place.
#
# Hidden states arrive as float32, or as 16-bit patterns (uint16) holding float16 or bfloat16: numpy
# has no bfloat16 dtype, so both 16-bit formats travel as uint16 and `bf16` says which. Every kernel
# accumulates in float32 and reads only the first `lengths[b]` positions of row b.

from cython.parallel cimport prange, parallel, threadid
from cpython.list cimport PyList_GET_ITEM
from cpython.long cimport PyLong_AsLong, PyLong_AsLongLong, PyLong_CheckExact
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from libc.math cimport sqrt, fabsf, rintf, isfinite, log1pf, INFINITY

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* IEEE half -> float, exact for every input (subnormals, inf, NaN payloads). */
    static inline float bs_half_to_float(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
        uint32_t exponent = (h >> 10) & 0x1fu;
        uint32_t mantissa = h & 0x3ffu;
        uint32_t bits;
        float f;
        if (exponent == 0x1fu) {
            bits = sign | 0x7f800000u | (mantissa << 13);
        } else if (exponent != 0) {
            bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
        } else if (mantissa == 0) {
            bits = sign;
        } else {
            f = (float)mantissa * 5.9604644775390625e-08f;  /* mantissa * 2^-24 */
            memcpy(&bits, &f, 4);
            bits |= sign;
        }
        memcpy(&f, &bits, 4);
        return f;
    }

    static inline float bs_bf16_to_float(uint16_t b) {
        uint32_t bits = (uint32_t)b << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }

    /* float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN. */
    static inline uint16_t bs_float_to_bf16(float f) {
        uint32_t bits;
        memcpy(&bits, &f, 4);
        if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
        bits += 0x7fffu + ((bits >> 16) & 1u);
        return (uint16_t)(bits >> 16);
    }
    """
    float bs_half_to_float(uint16_t h) noexcept nogil
    float bs_bf16_to_float(uint16_t b) noexcept nogil
    uint16_t bs_float_to_bf16(float f) noexcept nogil

ctypedef fused hidden_t:
    float
    uint16_t

# Pooling modes; the Python layer maps names to these numbers (POOLING_MODES in __init__.py).
# Several modes pool one row in a single pass over its tokens and are written side by side, in
# the order asked (sentence-transformers concatenates a model's modes the same way).
cdef enum:
    MODE_MEAN = 0
    MODE_MAX = 1
    MODE_CLS = 2
    MODE_MEAN_SQRT_LEN = 3
    MODE_WEIGHTED_MEAN = 4
    MODE_LAST_TOKEN = 5


cdef inline float load(const hidden_t* src, Py_ssize_t i, bint bf16) noexcept nogil:
    if hidden_t is float:
        return src[i]
    elif bf16:
        return bs_bf16_to_float(src[i])
    else:
        return bs_half_to_float(src[i])


cdef inline const float* token_vector(const hidden_t** layers, Py_ssize_t n_layers,
                                      Py_ssize_t offset, Py_ssize_t hidden, bint bf16,
                                      float* scratch) noexcept nogil:
    """One token's vector in float32: the element-wise mean over `n_layers` layers.

    A single float32 layer is returned in place (no copy): that is the hot path.
    """
    cdef Py_ssize_t layer, h
    cdef const hidden_t* src
    cdef float inv_layers
    if hidden_t is float:
        if n_layers == 1:
            return layers[0] + offset
    src = layers[0] + offset
    for h in range(hidden):
        scratch[h] = load(src, h, bf16)
    for layer in range(1, n_layers):
        src = layers[layer] + offset
        for h in range(hidden):
            scratch[h] += load(src, h, bf16)
    if n_layers > 1:
        inv_layers = 1.0 / n_layers
        for h in range(hidden):
            scratch[h] *= inv_layers
    return scratch


cdef void pool_row(const hidden_t** layers, Py_ssize_t n_layers, Py_ssize_t row_offset,
                   Py_ssize_t start, Py_ssize_t length, Py_ssize_t hidden, const int* modes,
                   Py_ssize_t n_modes, bint bf16, float* scratch, float* out) noexcept nogil:
    """Pool tokens start..length-1 of one row into `out`: one block of `hidden` floats per mode,
    in the order of `modes`. scratch holds 4 * hidden floats: the combined token, the running
    sum, the position-weighted sum and the running max.

    Weighted mean weighs token t by t + 1 (its position counted from the row's first token,
    prompt included), as sentence-transformers does; CLS is the first pooled token (`start`)."""
    cdef float* total = scratch + hidden
    cdef float* weighted = scratch + 2 * hidden
    cdef float* peak = scratch + 3 * hidden
    cdef bint does_sum = False, does_weighted = False, does_max = False
    cdef Py_ssize_t k, t, h
    cdef const float* tok
    cdef float v, m, weight, weights = 0, count = length - start, divisor
    cdef float* dst
    for k in range(n_modes):
        does_sum = does_sum or modes[k] == MODE_MEAN or modes[k] == MODE_MEAN_SQRT_LEN
        does_weighted = does_weighted or modes[k] == MODE_WEIGHTED_MEAN
        does_max = does_max or modes[k] == MODE_MAX
    if does_sum or does_weighted or does_max:
        # Start from the first token rather than from 0 / -inf: no sentinel values to reason about.
        tok = token_vector(layers, n_layers, row_offset + start * hidden, hidden, bf16, scratch)
        weight = start + 1
        weights = weight
        for h in range(hidden):
            total[h] = tok[h]
            weighted[h] = weight * tok[h]
            peak[h] = tok[h]
        for t in range(start + 1, length):
            tok = token_vector(layers, n_layers, row_offset + t * hidden, hidden, bf16, scratch)
            if does_sum:
                for h in range(hidden):
                    total[h] += tok[h]
            if does_weighted:
                weight = t + 1
                weights = weights + weight
                for h in range(hidden):
                    weighted[h] += weight * tok[h]
            if does_max:
                for h in range(hidden):
                    v = tok[h]
                    m = peak[h]
                    # `v != v` makes NaN win and then stick (v > NaN is always false), like numpy.max.
                    peak[h] = v if (v > m or v != v) else m
    for k in range(n_modes):
        dst = out + k * hidden
        if modes[k] == MODE_CLS or modes[k] == MODE_LAST_TOKEN:
            t = start if modes[k] == MODE_CLS else length - 1
            tok = token_vector(layers, n_layers, row_offset + t * hidden, hidden, bf16, scratch)
            memcpy(dst, tok, hidden * sizeof(float))
        elif modes[k] == MODE_MAX:
            memcpy(dst, peak, hidden * sizeof(float))
        elif modes[k] == MODE_WEIGHTED_MEAN:
            for h in range(hidden):
                dst[h] = weighted[h] / weights
        else:
            divisor = count if modes[k] == MODE_MEAN else sqrt(count)
            for h in range(hidden):
                dst[h] = total[h] / divisor


def pool(const hidden_t[:, :, ::1] first_layer, const size_t[::1] layer_ptrs, bint combine_mean,
         const int64_t[::1] lengths, const int64_t[::1] starts, const int[::1] modes, bint bf16,
         float[:, ::1] out, float[:, ::1] scratch, int n_threads):
    """Pool every row over tokens starts[b]..lengths[b]-1. `layer_ptrs` holds the data addresses
    of all layers (first_layer's too), each shaped like first_layer. combine_mean: average the
    layers per token, then pool; otherwise pool each layer into its own block of columns
    (concatenation), each block holding every mode."""
    cdef Py_ssize_t batch = first_layer.shape[0], seq = first_layer.shape[1]
    cdef Py_ssize_t hidden = first_layer.shape[2]
    cdef Py_ssize_t n_layers = layer_ptrs.shape[0]
    cdef Py_ssize_t n_modes = modes.shape[0]
    cdef Py_ssize_t width = hidden * n_modes
    cdef const hidden_t** layers = <const hidden_t**> &layer_ptrs[0]
    cdef Py_ssize_t b, layer
    cdef float* row_scratch
    with nogil, parallel(num_threads=n_threads):
        row_scratch = &scratch[threadid(), 0]
        for b in prange(batch, schedule='dynamic'):
            if combine_mean:
                pool_row(layers, n_layers, b * seq * hidden, starts[b], lengths[b], hidden,
                         &modes[0], n_modes, bf16, row_scratch, &out[b, 0])
            else:
                for layer in range(n_layers):
                    pool_row(layers + layer, 1, b * seq * hidden, starts[b], lengths[b], hidden,
                             &modes[0], n_modes, bf16, row_scratch, &out[b, layer * width])


def gather(const hidden_t[:, :, ::1] first_layer, const size_t[::1] layer_ptrs, bint combine_mean,
           const int64_t[::1] lengths, const int64_t[::1] row_starts, bint bf16,
           float[:, ::1] out, float[:, ::1] scratch, int n_threads):
    """Copy every row's real tokens, back to back, into `out` (sum(lengths), width): row b starts
    at out row row_starts[b]. Layers are combined per token as in `pool`."""
    cdef Py_ssize_t batch = first_layer.shape[0], seq = first_layer.shape[1]
    cdef Py_ssize_t hidden = first_layer.shape[2]
    cdef Py_ssize_t n_layers = layer_ptrs.shape[0]
    cdef const hidden_t** layers = <const hidden_t**> &layer_ptrs[0]
    cdef Py_ssize_t b, t, layer
    cdef float* row_scratch
    cdef const float* tok
    with nogil, parallel(num_threads=n_threads):
        row_scratch = &scratch[threadid(), 0]
        for b in prange(batch, schedule='dynamic'):
            for t in range(lengths[b]):
                if combine_mean:
                    tok = token_vector(layers, n_layers, (b * seq + t) * hidden, hidden, bf16,
                                       row_scratch)
                    memcpy(&out[row_starts[b] + t, 0], tok, hidden * sizeof(float))
                else:
                    for layer in range(n_layers):
                        tok = token_vector(layers + layer, 1, (b * seq + t) * hidden, hidden, bf16,
                                           row_scratch)
                        memcpy(&out[row_starts[b] + t, layer * hidden], tok, hidden * sizeof(float))


def l2_normalize(float[:, ::1] x, int n_threads):
    """Scale each row to unit L2 norm, in place. An all-zero row stays zero.

    The sum of squares is taken in double: in float32 it underflows below ~1e-19 per element and
    overflows above ~1e19, which would turn tiny or huge (but valid) vectors into 0 or NaN. It is
    four running sums, not one: a single one is a chain of dependent additions the compiler may
    not reorder; with a division per value it took 23 µs for 32 rows of 384, now 12.
    """
    cdef Py_ssize_t rows = x.shape[0], cols = x.shape[1], r, c, whole = cols - cols % 4
    cdef double norm, scale, s0, s1, s2, s3
    cdef float* row
    for r in prange(rows, nogil=True, num_threads=n_threads, schedule='static'):
        row = &x[r, 0]
        s0 = 0
        s1 = 0
        s2 = 0
        s3 = 0
        for c in range(0, whole, 4):
            s0 = s0 + <double> row[c] * row[c]
            s1 = s1 + <double> row[c + 1] * row[c + 1]
            s2 = s2 + <double> row[c + 2] * row[c + 2]
            s3 = s3 + <double> row[c + 3] * row[c + 3]
        for c in range(whole, cols):
            s0 = s0 + <double> row[c] * row[c]
        norm = sqrt((s0 + s1) + (s2 + s3))
        if norm > 0:
            scale = 1.0 / norm  # in double: the same float as dividing, but a division a row
            for c in range(cols):
                row[c] = <float> (row[c] * scale)


def to_bfloat16(const float[:, ::1] x, uint16_t[:, ::1] out, int n_threads):
    """Round every value to bfloat16 (nearest even); out holds the bit patterns."""
    cdef Py_ssize_t rows = x.shape[0], cols = x.shape[1], r, c
    for r in prange(rows, nogil=True, num_threads=n_threads, schedule='static'):
        for c in range(cols):
            out[r, c] = bs_float_to_bf16(x[r, c])


def quantize_int8(const float[:, ::1] x, int8_t[:, ::1] out, float[::1] scales, int n_threads):
    """Symmetric int8 per row: scale = max|finite x| / 127, q = round(x / scale).

    x ~= q * scale. NaN becomes 0; +-inf become +-127 (the row's extreme); an all-zero (or
    all-non-finite) row gets scale 0 and zeros.
    """
    cdef Py_ssize_t rows = x.shape[0], cols = x.shape[1], r, c
    cdef float peak, v, inv_scale
    for r in prange(rows, nogil=True, num_threads=n_threads, schedule='static'):
        peak = 0
        for c in range(cols):
            v = fabsf(x[r, c])
            if isfinite(v) and v > peak:
                peak = v
        scales[r] = peak / 127
        inv_scale = 127 / peak if peak > 0 else 0
        for c in range(cols):
            v = x[r, c]
            if v != v:
                out[r, c] = 0
            elif v >= peak:
                out[r, c] = 127 if peak > 0 or v > 0 else 0
            elif v <= -peak:
                out[r, c] = -127 if peak > 0 or v < 0 else 0
            else:
                out[r, c] = <int8_t> rintf(v * inv_scale)


def pack_sign_bits(const float[:, ::1] x, uint8_t[:, ::1] out, int n_threads):
    """Bit = (x > 0), eight to a byte, most significant bit first (numpy.packbits order); the
    last byte of a row is zero-padded. NaN and -0.0 give 0."""
    cdef Py_ssize_t rows = x.shape[0], cols = x.shape[1], r, c
    cdef uint8_t byte
    for r in prange(rows, nogil=True, num_threads=n_threads, schedule='static'):
        byte = 0
        for c in range(cols):
            if x[r, c] > 0:
                byte = byte | (0x80 >> (c & 7))
            if c & 7 == 7:
                out[r, c >> 3] = byte
                byte = 0
        if cols & 7:
            out[r, cols >> 3] = byte


cdef inline float splade_activation(float x, bint twice) noexcept nogil:
    """log(1 + relu(x)), log1p once more with `twice`; NaN stays NaN, -inf (no token) is 0."""
    if x > 0:
        x = log1pf(x)
        if twice:
            x = log1pf(x)
    elif x == x:  # not NaN: relu's zero
        x = 0
    return x


def splade(const hidden_t[:, :, ::1] logits, const int64_t[::1] lengths, bint sum_pool,
           bint twice, bint bf16, float[:, ::1] out, int n_threads):
    """SPLADE's pooling of masked-language-model logits (batch, seq, vocab): per row and
    vocabulary entry, log(1 + relu(x)) (log1p once more with `twice`) over the row's real
    tokens, their max or (sum_pool) their sum. NaN logits stay NaN, as in torch.

    The max is taken of the logits, and the activation applied once to it: relu and log1p
    never decrease, so max(f(x)) is f(max(x)), exactly, and log1p runs vocab times a row, not
    tokens x vocab times (it was half of a SPLADE model's time)."""
    cdef Py_ssize_t batch = logits.shape[0], vocab = logits.shape[2]
    cdef Py_ssize_t b, t, v
    cdef float x
    cdef const hidden_t* token
    cdef float* row
    with nogil:
        for b in prange(batch, num_threads=n_threads, schedule='dynamic'):
            row = &out[b, 0]
            for v in range(vocab):
                row[v] = 0 if sum_pool else -INFINITY
            for t in range(lengths[b]):
                token = &logits[b, t, 0]
                for v in range(vocab):
                    x = load(token, v, bf16)
                    if not sum_pool:
                        if x > row[v] or x != x:  # a NaN stays: nothing compares above it
                            row[v] = x
                        continue
                    row[v] = row[v] + splade_activation(x, twice)
            if not sum_pool:
                for v in range(vocab):
                    row[v] = splade_activation(row[v], twice)


def flatten_ids(list rows, int32_t[::1] out, int64_t[::1] offsets):
    """Token ids as the tokenizer hands them (a list per text of Python ints) back to back into
    `out`, and where each text starts in `offsets` (len(rows) + 1 entries; the Python layer sized
    both). One C loop over the ints: numpy converting each list was 1.3 µs a text of 30 tokens.
    Only exact ints are read (nothing of Python runs inside the loop, so no list can change
    under it); a value outside int32 raises."""
    cdef Py_ssize_t r, t, n, at = 0
    cdef list row
    cdef object value
    cdef long number
    if offsets.shape[0] != len(rows) + 1:
        raise ValueError("offsets: expected len(rows) + 1 entries")
    offsets[0] = 0
    for r in range(len(rows)):
        row = <list?> rows[r]
        n = len(row)
        if at + n > out.shape[0]:
            raise ValueError("out: too small for the rows")
        for t in range(n):
            value = <object> PyList_GET_ITEM(row, t)
            if not PyLong_CheckExact(value):
                raise TypeError(f"rows[{r}][{t}]: expected an int, got {type(value).__name__}")
            number = PyLong_AsLong(value)
            if number < -2147483648 or number > 2147483647:
                raise OverflowError(f"rows[{r}][{t}]: {number} does not fit int32")
            out[at + t] = <int32_t> number
        at += n
        offsets[r + 1] = at


def gather_rows(list flats, list offsets, const int64_t[::1] job_of, const int64_t[::1] index,
                int32_t[::1] out, int64_t[::1] out_offsets):
    """Texts of several buffers back to back into one: row r is text index[r] of buffer
    job_of[r] (flats[j] holds text i at offsets[j][i]:offsets[j][i + 1]), written to `out` from
    out_offsets[r] (len(job_of) + 1 entries). One C loop over a batch's rows: numpy slicing was a
    call a text. Every buffer, index and size is checked here (IndexError, ValueError): a bad
    one must not read or write outside an array. The arrays are C-contiguous (the Python layer
    makes them so) and stay alive in the lists while this runs."""
    cdef Py_ssize_t buffers = len(flats), rows = job_of.shape[0]
    if len(offsets) != buffers:
        raise ValueError("offsets: expected one array per buffer")
    if index.shape[0] != rows or out_offsets.shape[0] != rows + 1:
        raise ValueError("index and out_offsets: expected len(job_of) and len(job_of) + 1 entries")
    # per buffer: its ids and texts counts, where its two arrays lie
    cdef int64_t* sizes = <int64_t*> malloc(2 * (buffers + 1) * sizeof(int64_t))
    cdef size_t* places = <size_t*> malloc(2 * (buffers + 1) * sizeof(size_t))
    if sizes == NULL or places == NULL:
        free(sizes)
        free(places)
        raise MemoryError()
    try:
        _gather_rows(flats, offsets, job_of, index, out, out_offsets, sizes, places)
    finally:
        free(sizes)
        free(places)


cdef _gather_rows(list flats, list offsets, const int64_t[::1] job_of, const int64_t[::1] index,
                  int32_t[::1] out, int64_t[::1] out_offsets, int64_t* sizes, size_t* places):
    cdef Py_ssize_t buffers = len(flats), rows = job_of.shape[0], r, j, i, n, at = 0
    cdef const int32_t[::1] flat
    cdef const int64_t[::1] off
    cdef int64_t start, end
    for j in range(buffers):
        flat, off = flats[j], offsets[j]
        sizes[2 * j], sizes[2 * j + 1] = flat.shape[0], off.shape[0] - 1
        places[2 * j] = <size_t> &flat[0] if flat.shape[0] else 0
        places[2 * j + 1] = <size_t> &off[0] if off.shape[0] else 0
    cdef const int32_t* source
    cdef const int64_t* starts
    out_offsets[0] = 0
    for r in range(rows):
        j = job_of[r]
        if j < 0 or j >= buffers:
            raise IndexError(f"job_of[{r}]: {j} is not a buffer (of {buffers})")
        i = index[r]
        if i < 0 or i >= sizes[2 * j + 1]:
            raise IndexError(f"index[{r}]: {i} is not a text of buffer {j}")
        starts = <const int64_t*> places[2 * j + 1]
        start, end = starts[i], starts[i + 1]
        n = end - start
        if start < 0 or n < 0 or end > sizes[2 * j] or at + n > out.shape[0]:
            raise ValueError(f"row {r}: text {i} of buffer {j} runs outside its buffer or out")
        if n:
            source = <const int32_t*> places[2 * j]
            memcpy(&out[at], source + start, n * sizeof(int32_t))
        at += n
        out_offsets[r + 1] = at



def group_rows(const int64_t[::1] group, int64_t[::1] start, int64_t[::1] rank,
               int64_t[::1] number, int64_t[::1] order, int64_t[::1] present,
               int64_t[::1] ends):
    """Rows by their group (0 <= group[r] < len(start)), by counting, in one pass each way:
    the groups present, ascending, into present[:k] (returns k); number[r] row r's group's place
    among them; order the rows grouped (in row order within a group), group k's ending at
    ends[k]. start and rank are scratch, one entry a group, start zeroed; number, order, present
    and ends hold one entry a row. The Python layer sized them."""
    cdef Py_ssize_t rows = group.shape[0], groups = start.shape[0], r, g, k = 0
    cdef int64_t at = 0, n
    if rank.shape[0] != groups or number.shape[0] != rows or order.shape[0] != rows \
            or present.shape[0] < rows or ends.shape[0] < rows:
        raise ValueError("group_rows: arrays of the wrong size")
    for r in range(rows):
        g = group[r]
        if g < 0 or g >= groups:
            raise IndexError(f"group[{r}]: {g} is not a group (of {groups})")
        start[g] += 1
    for g in range(groups):  # start[g]: a count, then where group g's rows begin in order
        n = start[g]
        if n:
            start[g] = at
            at += n
            rank[g] = k
            present[k] = g
            ends[k] = at
            k += 1
    for r in range(rows):
        g = group[r]
        order[start[g]] = r
        start[g] += 1
        number[r] = rank[g]
    return k


cdef inline int64_t _key_at(list keys, Py_ssize_t i) except? -1:
    cdef object key = <object> PyList_GET_ITEM(keys, i)
    if not PyLong_CheckExact(key):
        raise TypeError(f"keys[{i}]: expected an int, got {type(key).__name__}")
    return PyLong_AsLongLong(key)


def greedy_run(list keys, Py_ssize_t at, int64_t budget, int shift):
    """The run holding keys[at], of the runs that cut sorted `keys` (each a length above `shift`
    bits) greedily from the first, each the longest whose count x last length fits `budget` (one
    key always does): (its first index, the index past its last). Galloping, then bisecting, over
    the list as it is: no Python runs inside the loop (only exact ints are read), so the list
    cannot change under it."""
    cdef Py_ssize_t end = len(keys), low = 0, fits, step, over, middle
    if at < 0 or at >= end:
        raise IndexError(f"at: {at} is not an index of {end} keys")
    while True:
        fits, step = low + 1, 1  # keys[low:fits] fits
        while fits + step <= end and \
                (fits + step - low) * (_key_at(keys, fits + step - 1) >> shift) <= budget:
            fits, step = fits + step, step * 2
        over = min(fits + step, end + 1)  # keys[low:over] does not fit, or runs past the end
        while over - fits > 1:
            middle = (fits + over) // 2
            if (middle - low) * (_key_at(keys, middle - 1) >> shift) <= budget:
                fits = middle
            else:
                over = middle
        if fits > at:
            return low, fits
        low = fits
