/*
 * The two loops of the sample-plan build that NumPy cannot vectorise, with outputs equal to
 * PaddleNLP's (bi150_ray/data/kernels.py calls them; it falls back to NumPy when this module was
 * not built).
 *
 * shuffle: NumPy's legacy RandomState.shuffle of a 1-D integer array, replayed with the same
 * MT19937 draws and therefore the same permutation, but with the swap targets drawn ahead and
 * prefetched.
 *
 * Why: the sample plan must equal PaddleNLP's bit for bit, and PaddleNLP shuffles doc_idx (tens of
 * millions of entries at the reference job's size) with RandomState.shuffle. That shuffle is most of
 * the plan build: per swap NumPy calls the bit generator through a function pointer, memcpy's an
 * item of run-time size three times, and waits for a random cache line. Here the next D swap
 * targets are known before they are needed, so their cache lines are fetched while earlier swaps
 * run.
 *
 * What must match NumPy (numpy/random/mtrand.pyx `_shuffle_raw`, src/legacy + src/mt19937):
 *   for i = n-1 .. 1:  j = random_interval(i);  swap(a[i], a[j])
 *   random_interval(max): mask = smallest 2^k-1 >= max; draw next_uint32 & mask (next_uint64 when
 *   max > 2^32-1) until the value is <= max.
 * The caller hands in the generator's key (624 uint32, updated in place) and position, and gets
 * the new position back, so the RandomState continues exactly where NumPy's would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MT_N 624
#define MT_M 397
#define MATRIX_A 0x9908b0dfUL
#define UPPER_MASK 0x80000000UL
#define LOWER_MASK 0x7fffffffUL
#define AHEAD 16 /* swap targets drawn ahead of use */

typedef struct {
    uint32_t *key;
    int pos;
} mt_state;

static void mt_refill(uint32_t *key)
{
    uint32_t y;
    int i;
    for (i = 0; i < MT_N - MT_M; i++) {
        y = (key[i] & UPPER_MASK) | (key[i + 1] & LOWER_MASK);
        key[i] = key[i + MT_M] ^ (y >> 1) ^ (-(y & 1) & MATRIX_A);
    }
    for (; i < MT_N - 1; i++) {
        y = (key[i] & UPPER_MASK) | (key[i + 1] & LOWER_MASK);
        key[i] = key[i + (MT_M - MT_N)] ^ (y >> 1) ^ (-(y & 1) & MATRIX_A);
    }
    y = (key[MT_N - 1] & UPPER_MASK) | (key[0] & LOWER_MASK);
    key[MT_N - 1] = key[MT_M - 1] ^ (y >> 1) ^ (-(y & 1) & MATRIX_A);
}

static inline uint32_t mt_next32(mt_state *s)
{
    uint32_t y;
    if (s->pos == MT_N) {
        mt_refill(s->key);
        s->pos = 0;
    }
    y = s->key[s->pos++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680UL;
    y ^= (y << 15) & 0xefc60000UL;
    y ^= (y >> 18);
    return y;
}

static inline uint64_t random_interval(mt_state *s, uint64_t max)
{
    uint64_t mask = max, value;
    if (max == 0)
        return 0;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    if (max <= 0xffffffffUL) {
        while ((value = (mt_next32(s) & mask)) > max)
            ;
    } else {
        for (;;) {
            uint64_t hi = mt_next32(s);
            value = ((hi << 32) | mt_next32(s)) & mask;
            if (value <= max)
                break;
        }
    }
    return value;
}

#define SHUFFLE(T)                                                                    \
    static void shuffle_##T(T *a, int64_t n, mt_state *s)                             \
    {                                                                                 \
        int64_t ring[AHEAD], i, k, pre = n - 1 < AHEAD ? n - 1 : AHEAD;                 \
        for (k = 0; k < pre; k++) {                                                   \
            ring[k] = (int64_t)random_interval(s, (uint64_t)(n - 1 - k));             \
            __builtin_prefetch(&a[ring[k]], 1);                                       \
        }                                                                             \
        for (i = n - 1, k = 0; i >= 1; i--, k = (k + 1 == AHEAD) ? 0 : k + 1) {       \
            int64_t j = ring[k];                                                      \
            T t;                                                                      \
            if (i - AHEAD >= 1) {                                                     \
                ring[k] = (int64_t)random_interval(s, (uint64_t)(i - AHEAD));         \
                __builtin_prefetch(&a[ring[k]], 1);                                   \
            }                                                                         \
            t = a[j];                                                                 \
            a[j] = a[i];                                                              \
            a[i] = t;                                                                 \
        }                                                                             \
    }

SHUFFLE(int32_t)
SHUFFLE(int64_t)

static PyObject *shuffle(PyObject *self, PyObject *args)
{
    Py_buffer data, key;
    Py_ssize_t itemsize;
    int pos;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*nw*i", &data, &itemsize, &key, &pos))
        return NULL;
    if (itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "item size must be 4 or 8 bytes, got %zd", itemsize);
    } else if (data.len % itemsize != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer length is not a multiple of the item size");
    } else if (key.len != MT_N * 4 || ((uintptr_t)key.buf % 4) != 0 || ((uintptr_t)data.buf % itemsize) != 0) {
        PyErr_SetString(PyExc_ValueError, "key must be 624 aligned uint32 and data aligned to its item size");
    } else if (pos < 0 || pos > MT_N) {
        PyErr_Format(PyExc_ValueError, "MT19937 position must lie in [0, 624], got %d", pos);
    } else {
        mt_state s = {(uint32_t *)key.buf, pos};
        int64_t n = (int64_t)(data.len / itemsize);
        Py_BEGIN_ALLOW_THREADS
        if (n > 1) {
            if (itemsize == 4)
                shuffle_int32_t((int32_t *)data.buf, n, &s);
            else
                shuffle_int64_t((int64_t *)data.buf, n, &s);
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromLong(s.pos);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return result;
}

/*
 * sample_starts: PaddleNLP's fast_dataindex build_sample_idx. Sample k starts at flat token k*L of
 * the shuffled document stream (samples overlap by one token); its row is (position in doc_idx of
 * the document holding that token, offset in it). A token belongs to the first document whose end
 * lies past it, so empty documents are passed over as the C++ walk passes over them. Row 0 is
 * (0, 0) and is left to the caller. Returns the stream's token count, or -1 when doc_idx names a
 * document outside sizes.
 */
#define WALK(T)                                                                       \
    static int64_t walk_##T(const int32_t *sizes, int64_t n_sizes, const T *doc_idx,  \
                            int64_t n_docs, int64_t L, int32_t *out, int64_t rows)    \
    {                                                                                 \
        int64_t start = 0, k = 1, next = L, d;                                        \
        for (d = 0; d < n_docs; d++) {                                                \
            int64_t doc = (int64_t)doc_idx[d], end;                                   \
            if (doc < 0 || doc >= n_sizes)                                            \
                return -1;                                                            \
            end = start + sizes[doc];                                                 \
            while (next < end && k < rows) {                                          \
                out[2 * k] = (int32_t)d;                                              \
                out[2 * k + 1] = (int32_t)(next - start);                             \
                k++;                                                                  \
                next += L;                                                            \
            }                                                                         \
            start = end;                                                              \
        }                                                                             \
        return start;                                                                 \
    }

WALK(int32_t)
WALK(int64_t)

static PyObject *sample_starts(PyObject *self, PyObject *args)
{
    Py_buffer sizes, docs, out;
    Py_ssize_t doc_itemsize, seq_length;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*nnw*", &sizes, &docs, &doc_itemsize, &seq_length, &out))
        return NULL;
    if (doc_itemsize != 4 && doc_itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "doc_idx item size must be 4 or 8 bytes, got %zd", doc_itemsize);
    } else if (seq_length < 1) {
        PyErr_SetString(PyExc_ValueError, "seq_length must be >= 1");
    } else if (sizes.len % 4 || docs.len % doc_itemsize || out.len % 8 || ((uintptr_t)sizes.buf % 4) ||
               ((uintptr_t)docs.buf % doc_itemsize) || ((uintptr_t)out.buf % 4)) {
        PyErr_SetString(PyExc_ValueError, "sizes must be int32, doc_idx int32/int64 and out int32 [rows, 2], aligned");
    } else {
        int64_t end;
        Py_BEGIN_ALLOW_THREADS
        if (doc_itemsize == 4)
            end = walk_int32_t((const int32_t *)sizes.buf, sizes.len / 4, (const int32_t *)docs.buf,
                               docs.len / 4, seq_length, (int32_t *)out.buf, out.len / 8);
        else
            end = walk_int64_t((const int32_t *)sizes.buf, sizes.len / 4, (const int64_t *)docs.buf,
                               docs.len / 8, seq_length, (int32_t *)out.buf, out.len / 8);
        Py_END_ALLOW_THREADS
        if (end < 0)
            PyErr_SetString(PyExc_ValueError, "doc_idx names a document outside sizes");
        else
            result = PyLong_FromLongLong(end);
    }
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&docs);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"sample_starts", sample_starts, METH_VARARGS,
     "sample_starts(sizes, doc_idx, doc_itemsize, seq_length, out) -> tokens: fill rows 1.. of "
     "sample_idx (int32 [rows, 2]) as PaddleNLP's build_sample_idx does."},
    {"shuffle", shuffle, METH_VARARGS,
     "shuffle(data, itemsize, key, pos) -> pos: RandomState.shuffle of a contiguous int32/int64 "
     "buffer from MT19937 state (key updated in place)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
