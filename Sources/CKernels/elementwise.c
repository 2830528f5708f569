/* Elementwise, strided, normalisation, pooling, loss and optimizer kernels (contracts in
 * ckernels.h). Memory-bound loops: one plain version each, vectorised by the compiler — except
 * ReLU's backward, which it compiled to a branch per element (relu_bwd_avx2 below). */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "internal.h"

/* ---------------------------------------------------------------------------------------- */
/* Unary                                                                                     */
/* ---------------------------------------------------------------------------------------- */

static void unary_fwd_serial(ql_unary_op op, float *y, const float *x, int64_t n) {
    switch (op) {
    case QL_UNARY_RELU: for (int64_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f; break;
    case QL_UNARY_SIGMOID: for (int64_t i = 0; i < n; i++) y[i] = sigmoidf_stable(x[i]); break;
    case QL_UNARY_SILU: for (int64_t i = 0; i < n; i++) y[i] = x[i] * sigmoidf_stable(x[i]); break;
    case QL_UNARY_EXP: for (int64_t i = 0; i < n; i++) y[i] = expf(x[i]); break;
    case QL_UNARY_LOG: for (int64_t i = 0; i < n; i++) y[i] = logf(x[i]); break;
    case QL_UNARY_NEG: for (int64_t i = 0; i < n; i++) y[i] = -x[i]; break;
    case QL_UNARY_ABS: for (int64_t i = 0; i < n; i++) y[i] = fabsf(x[i]); break;
    case QL_UNARY_SQRT: for (int64_t i = 0; i < n; i++) y[i] = sqrtf(x[i]); break;
    case QL_UNARY_TANH: for (int64_t i = 0; i < n; i++) y[i] = tanhf(x[i]); break;
    case QL_UNARY_GELU: for (int64_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f)); break;
    }
}

static void unary_bwd_serial(ql_unary_op op, float *restrict dx, const float *restrict dy,
                             const float *restrict x, const float *restrict y, int64_t n) {
    switch (op) {
    case QL_UNARY_RELU: for (int64_t i = 0; i < n; i++) dx[i] += x[i] > 0.0f ? dy[i] : 0.0f; break;
    case QL_UNARY_SIGMOID: for (int64_t i = 0; i < n; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]); break;
    case QL_UNARY_SILU:
        for (int64_t i = 0; i < n; i++) {
            float s = sigmoidf_stable(x[i]);
            dx[i] += dy[i] * s * (1.0f + x[i] * (1.0f - s));
        }
        break;
    case QL_UNARY_EXP: for (int64_t i = 0; i < n; i++) dx[i] += dy[i] * y[i]; break;
    case QL_UNARY_LOG: for (int64_t i = 0; i < n; i++) dx[i] += dy[i] / x[i]; break;
    case QL_UNARY_NEG: for (int64_t i = 0; i < n; i++) dx[i] -= dy[i]; break;
    case QL_UNARY_ABS: for (int64_t i = 0; i < n; i++) dx[i] += x[i] > 0.0f ? dy[i] : (x[i] < 0.0f ? -dy[i] : 0.0f); break;
    case QL_UNARY_SQRT: for (int64_t i = 0; i < n; i++) dx[i] += dy[i] * 0.5f / y[i]; break;
    case QL_UNARY_TANH: for (int64_t i = 0; i < n; i++) dx[i] += dy[i] * (1.0f - y[i] * y[i]); break;
    case QL_UNARY_GELU: /* d/dx x Phi(x) = Phi(x) + x phi(x) */
        for (int64_t i = 0; i < n; i++) {
            float cdf = 0.5f * (1.0f + erff(x[i] * 0.70710678118654752f));
            float pdf = 0.39894228040143268f * expf(-0.5f * x[i] * x[i]);
            dx[i] += dy[i] * (cdf + x[i] * pdf);
        }
        break;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Strided iteration: the last dim is the inner loop, the others advance an odometer.       */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    int ndim;
    int64_t shape[QL_MAX_DIMS], idx[QL_MAX_DIMS];
} odometer;

static int odo_init(odometer *o, const int64_t *shape, int ndim, int64_t *total) {
    if (ndim < 0 || ndim > QL_MAX_DIMS) return QL_EINVAL;
    o->ndim = ndim;
    *total = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return QL_EINVAL;
        o->shape[d] = shape[d];
        o->idx[d] = 0;
        *total *= shape[d];
    }
    return QL_OK;
}

/* offset of the current outer index for one operand */
static inline int64_t odo_offset(const odometer *o, const int64_t *strides) {
    int64_t off = 0;
    for (int d = 0; d < o->ndim - 1; d++) off += o->idx[d] * strides[d];
    return off;
}

static inline void odo_next_row(odometer *o) {
    for (int d = o->ndim - 2; d >= 0; d--) {
        if (++o->idx[d] < o->shape[d]) return;
        o->idx[d] = 0;
    }
}

static inline float binop(ql_binary_op op, float a, float b) {
    switch (op) {
    case QL_BINARY_ADD: return a + b;
    case QL_BINARY_SUB: return a - b;
    case QL_BINARY_MUL: return a * b;
    case QL_BINARY_DIV: return a / b;
    case QL_BINARY_MAX: return a >= b ? a : b;
    case QL_BINARY_MIN: return a <= b ? a : b;
    }
    return 0.0f;
}

static void binary_dense(ql_binary_op op, float *out, const float *a, const float *b, int64_t n);

int ql_binary_strided(ql_binary_op op, float *out, const float *a, const int64_t *a_strides,
                      const float *b, const int64_t *b_strides, const int64_t *shape, int ndim) {
    odometer o;
    int64_t total;
    if (odo_init(&o, shape, ndim, &total)) return QL_EINVAL;
    if (total == 0) return QL_OK;
    if (ndim == 0) { out[0] = binop(op, a[0], b[0]); return QL_OK; }
    /* both operands dense in the output's shape (adding a block's branches, a residual): one
     * flat loop, in chunks across the threads, instead of a row at a time */
    int dense = 1;
    for (int64_t d = ndim - 1, st = 1; d >= 0 && dense; st *= shape[d], d--)
        dense = shape[d] == 1 || (a_strides[d] == st && b_strides[d] == st);
    if (dense) {
        binary_dense(op, out, a, b, total);
        return QL_OK;
    }
    int64_t inner = shape[ndim - 1], sa = a_strides[ndim - 1], sb = b_strides[ndim - 1];
    for (int64_t r = 0; r < total / inner; r++) {
        const float *ar = a + odo_offset(&o, a_strides), *br = b + odo_offset(&o, b_strides);
        float *orow = out + r * inner;
        if (sa == 1 && sb == 1) {
            switch (op) { /* the common dense cases, as separate loops so they vectorise */
            case QL_BINARY_ADD: for (int64_t i = 0; i < inner; i++) orow[i] = ar[i] + br[i]; break;
            case QL_BINARY_MUL: for (int64_t i = 0; i < inner; i++) orow[i] = ar[i] * br[i]; break;
            default: for (int64_t i = 0; i < inner; i++) orow[i] = binop(op, ar[i], br[i]);
            }
        } else {
            for (int64_t i = 0; i < inner; i++) orow[i] = binop(op, ar[i * sa], br[i * sb]);
        }
        odo_next_row(&o);
    }
    return QL_OK;
}

int ql_binary_strided_bwd(ql_binary_op op, float *da, const int64_t *a_strides, float *db,
                          const int64_t *b_strides, const float *dout, const float *a,
                          const float *b, const int64_t *shape, int ndim) {
    odometer o;
    int64_t total;
    if (odo_init(&o, shape, ndim, &total)) return QL_EINVAL;
    if (total == 0) return QL_OK;
    int64_t inner = ndim ? shape[ndim - 1] : 1;
    int64_t sa = ndim ? a_strides[ndim - 1] : 0, sb = ndim ? b_strides[ndim - 1] : 0;
    /* dense operands of the output's shape: the common case of adding branches */
    int dense = 1;
    int64_t st = 1;
    for (int d = ndim - 1; d >= 0 && dense; d--) {
        if (a_strides[d] != st || b_strides[d] != st) dense = 0;
        st *= shape[d];
    }
    if (dense && (op == QL_BINARY_ADD || op == QL_BINARY_SUB || op == QL_BINARY_MUL)) {
        for (int64_t i = 0; i < total; i++) {
            float gi = dout[i], av = a[i], bv = b[i];
            if (da) da[i] += op == QL_BINARY_MUL ? gi * bv : gi;
            if (db) db[i] += op == QL_BINARY_MUL ? gi * av : (op == QL_BINARY_SUB ? -gi : gi);
        }
        return QL_OK;
    }
    for (int64_t r = 0; r < total / inner; r++) {
        int64_t oa = ndim ? odo_offset(&o, a_strides) : 0, ob = ndim ? odo_offset(&o, b_strides) : 0;
        const float *g = dout + r * inner;
        for (int64_t i = 0; i < inner; i++) {
            int64_t ia = oa + i * sa, ib = ob + i * sb;
            float av = a[ia], bv = b[ib], gi = g[i];
            switch (op) {
            case QL_BINARY_ADD: if (da) da[ia] += gi; if (db) db[ib] += gi; break;
            case QL_BINARY_SUB: if (da) da[ia] += gi; if (db) db[ib] -= gi; break;
            case QL_BINARY_MUL: if (da) da[ia] += gi * bv; if (db) db[ib] += gi * av; break;
            case QL_BINARY_DIV: if (da) da[ia] += gi / bv; if (db) db[ib] -= gi * av / (bv * bv); break;
            case QL_BINARY_MAX:
                if (av >= bv) { if (da) da[ia] += gi; } else if (db) db[ib] += gi;
                break;
            case QL_BINARY_MIN:
                if (av <= bv) { if (da) da[ia] += gi; } else if (db) db[ib] += gi;
                break;
            }
        }
        if (ndim) odo_next_row(&o);
    }
    return QL_OK;
}

int ql_copy_strided(float *restrict out, const float *restrict in, const int64_t *in_strides,
                    const int64_t *shape, int ndim) {
    odometer o;
    int64_t total;
    if (odo_init(&o, shape, ndim, &total)) return QL_EINVAL;
    if (total == 0) return QL_OK;
    if (ndim == 0) { out[0] = in[0]; return QL_OK; }
    int64_t inner = shape[ndim - 1], s = in_strides[ndim - 1];
    for (int64_t r = 0; r < total / inner; r++) {
        const float *src = in + odo_offset(&o, in_strides);
        float *dst = out + r * inner;
        if (s == 1) memcpy(dst, src, sizeof(float) * (size_t)inner);
        else for (int64_t i = 0; i < inner; i++) dst[i] = src[i * s];
        odo_next_row(&o);
    }
    return QL_OK;
}

int ql_accumulate_strided(float *out, const int64_t *out_strides, const float *restrict in,
                          const int64_t *shape, int ndim) {
    odometer o;
    int64_t total;
    if (odo_init(&o, shape, ndim, &total)) return QL_EINVAL;
    if (total == 0) return QL_OK;
    if (ndim == 0) { out[0] += in[0]; return QL_OK; }
    int64_t inner = shape[ndim - 1], s = out_strides[ndim - 1];
    for (int64_t r = 0; r < total / inner; r++) {
        float *dst = out + odo_offset(&o, out_strides);
        const float *src = in + r * inner;
        if (s == 1) for (int64_t i = 0; i < inner; i++) dst[i] += src[i];
        else if (s == 0) { double acc = 0; for (int64_t i = 0; i < inner; i++) acc += src[i]; dst[0] += (float)acc; }
        else for (int64_t i = 0; i < inner; i++) dst[i * s] += src[i];
        odo_next_row(&o);
    }
    return QL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* BLAS-1 style                                                                              */
/* ---------------------------------------------------------------------------------------- */
void ql_axpy(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void ql_scale_shift(float *y, const float *x, float a, float b, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = a * x[i] + b;
}

double ql_sum(const float *x, int64_t n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) { s0 += x[i]; s1 += x[i + 1]; s2 += x[i + 2]; s3 += x[i + 3]; }
    for (; i < n; i++) s0 += x[i];
    return (s0 + s1) + (s2 + s3);
}

float ql_absmax(const float *x, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) { float a = fabsf(x[i]); m = a > m ? a : m; }
    return m;
}

int64_t ql_first_nonfinite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

void ql_minmax(const float *x, int64_t n, float *lo, float *hi) {
    float l = INFINITY, h = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        l = x[i] < l ? x[i] : l;
        h = x[i] > h ? x[i] : h;
    }
    *lo = l;
    *hi = h;
}

/* ---------------------------------------------------------------------------------------- */
/* Softmax family (max-subtracted, sums in double)                                           */
/* ---------------------------------------------------------------------------------------- */
static float row_max(const float *x, int cols) {
    float m = -INFINITY;
    for (int c = 0; c < cols; c++) m = x[c] > m ? x[c] : m;
    return m;
}

/* exp(t) for a softmax's t = x - max <= 0: ql_exp_nonpos, 0 below -87 (where it would give
 * exp(-87) ~ 1.6e-38; the true value is below that, so a masked -inf key weighs 0 as it should)
 * and NaN kept (an inf or NaN input makes its row NaN, as libm's expf did). */
static inline float softmax_exp(float t) { return t >= -87.0f ? ql_exp_nonpos(t) : (t != t ? t : 0.0f); }

/* One row. The order of operations is the specification both paths follow, so they give the
 * same bits: the max and the sum run over 8 lanes, element c in lane c % 8 (the sum in
 * double), and the lanes are combined as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)) (for the
 * max any order gives the same value); then each exponential is scaled by 1 / sum. */
static void softmax_row_ref(float *y, const float *x, int cols) {
    float m8[8];
    for (int l = 0; l < 8; l++) m8[l] = -INFINITY;
    for (int c = 0; c < cols; c++) m8[c % 8] = x[c] > m8[c % 8] ? x[c] : m8[c % 8];
    float m = m8[0];
    for (int l = 1; l < 8; l++) m = m8[l] > m ? m8[l] : m;
    double s8[8] = {0};
    for (int c = 0; c < cols; c++) { y[c] = softmax_exp(x[c] - m); s8[c % 8] += y[c]; }
    double s = ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]));
    float inv = (float)(1.0 / s);
    for (int c = 0; c < cols; c++) y[c] *= inv;
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static void softmax_row_avx2(float *y, const float *x, int cols) {
    int c8 = cols & ~7, c;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (c = 0; c < c8; c += 8) vm = _mm256_max_ps(_mm256_loadu_ps(x + c), vm); /* x > m ? x : m */
    float m8[8];
    _mm256_storeu_ps(m8, vm);
    for (; c < cols; c++) m8[c % 8] = x[c] > m8[c % 8] ? x[c] : m8[c % 8];
    float m = m8[0];
    for (int l = 1; l < 8; l++) m = m8[l] > m ? m8[l] : m;
    const __m256 lim = _mm256_set1_ps(-87.0f);
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    vm = _mm256_set1_ps(m);
    for (c = 0; c < c8; c += 8) {
        __m256 t = _mm256_sub_ps(_mm256_loadu_ps(x + c), vm);
        __m256 e = _mm256_and_ps(ql_exp_nonpos8(t), _mm256_cmp_ps(t, lim, _CMP_GE_OQ));
        e = _mm256_blendv_ps(e, t, _mm256_cmp_ps(t, t, _CMP_UNORD_Q));
        _mm256_storeu_ps(y + c, e);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double s8[8];
    _mm256_storeu_pd(s8, lo);
    _mm256_storeu_pd(s8 + 4, hi);
    for (; c < cols; c++) { y[c] = softmax_exp(x[c] - m); s8[c % 8] += y[c]; }
    double s = ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]));
    __m256 inv = _mm256_set1_ps((float)(1.0 / s));
    for (c = 0; c < c8; c += 8) _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(y + c), inv));
    for (; c < cols; c++) y[c] *= (float)(1.0 / s);
}
#endif

static void softmax_rows_range(int avx2, float *y, const float *x, int64_t r0, int64_t r1, int cols) {
    for (int64_t r = r0; r < r1; r++) {
#if defined(__x86_64__) || defined(__i386__)
        if (avx2) { softmax_row_avx2(y + r * cols, x + r * cols, cols); continue; }
#endif
        softmax_row_ref(y + r * cols, x + r * cols, cols);
    }
}

typedef struct {
    float *y;
    const float *x;
    int64_t rows;
    int cols, tasks, avx2;
} softmax_job;

static void softmax_task(int t, void *p) {
    const softmax_job *j = (const softmax_job *)p;
    softmax_rows_range(j->avx2, j->y, j->x, t * j->rows / j->tasks, (t + 1) * j->rows / j->tasks, j->cols);
}

/* Rows split between the threads where there are enough elements (each row is computed as it
 * would be alone: the same bits at any thread count, and on either path). */
int ql_softmax_rows_isa(ql_isa isa, float *y, const float *x, int64_t rows, int cols) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    int64_t threads = ql_get_num_threads();
    int tasks = rows * cols < 8192 || rows < 2 ? 1 : (int)(rows < 4 * threads ? rows : 4 * threads);
    softmax_job j = {y, x, rows, cols, tasks, level >= QL_ISA_AVX2};
    if (tasks == 1) softmax_rows_range(j.avx2, y, x, 0, rows, cols);
    else ql_parallel_for(tasks, softmax_task, &j);
    return QL_OK;
}

void ql_softmax_rows(float *y, const float *x, int64_t rows, int cols) { ql_softmax_rows_isa(QL_ISA_BEST, y, x, rows, cols); }

void ql_log_softmax_rows(float *y, const float *x, int64_t rows, int cols) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        float m = row_max(xr, cols);
        double s = 0;
        for (int c = 0; c < cols; c++) s += expf(xr[c] - m);
        float lse = m + (float)log(s);
        for (int c = 0; c < cols; c++) yr[c] = xr[c] - lse;
    }
}

void ql_softmax_rows_bwd(float *dx, const float *dy, const float *y, int64_t rows, int cols) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = dy + r * cols, *yr = y + r * cols;
        double dot = 0;
        for (int c = 0; c < cols; c++) dot += (double)g[c] * yr[c];
        for (int c = 0; c < cols; c++) dx[r * cols + c] += yr[c] * (g[c] - (float)dot);
    }
}

void ql_log_softmax_rows_bwd(float *dx, const float *dy, const float *y, int64_t rows, int cols) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = dy + r * cols, *yr = y + r * cols;
        double s = 0;
        for (int c = 0; c < cols; c++) s += g[c];
        for (int c = 0; c < cols; c++) dx[r * cols + c] += g[c] - expf(yr[c]) * (float)s;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Layer norm and batch norm                                                                 */
/* ---------------------------------------------------------------------------------------- */
void ql_layer_norm_fwd(float *y, float *mean, float *rstd, const float *x, const float *gamma,
                       const float *beta, int64_t rows, int cols, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        double s = 0, s2 = 0;
        for (int c = 0; c < cols; c++) s += xr[c];
        double mu = s / cols;
        for (int c = 0; c < cols; c++) { double d = xr[c] - mu; s2 += d * d; }
        float m = (float)mu, rs = (float)(1.0 / sqrt(s2 / cols + eps));
        mean[r] = m;
        rstd[r] = rs;
        for (int c = 0; c < cols; c++) {
            float v = (xr[c] - m) * rs;
            y[r * cols + c] = v * (gamma ? gamma[c] : 1.0f) + (beta ? beta[c] : 0.0f);
        }
    }
}

void ql_layer_norm_bwd(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                       const float *mean, const float *rstd, const float *gamma, int64_t rows,
                       int cols) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols, *g = dy + r * cols;
        float m = mean[r], rs = rstd[r];
        double sum_d = 0, sum_dx = 0;
        for (int c = 0; c < cols; c++) {
            float xhat = (xr[c] - m) * rs, d = g[c] * (gamma ? gamma[c] : 1.0f);
            sum_d += d;
            sum_dx += d * xhat;
            if (dgamma) dgamma[c] += g[c] * xhat;
            if (dbeta) dbeta[c] += g[c];
        }
        float a = (float)(sum_d / cols), b = (float)(sum_dx / cols);
        for (int c = 0; c < cols; c++) {
            float xhat = (xr[c] - m) * rs, d = g[c] * (gamma ? gamma[c] : 1.0f);
            dx[r * cols + c] += rs * (d - a - xhat * b);
        }
    }
}

/* Batch norm's per-channel sums, in double, over one channel's N planes of HW floats. The
 * scalar loops are the specification; their double additions form one dependent chain per sum
 * (the compiler may not reorder them), about 4 cycles an element, which made batch norm's
 * backward twice PyTorch's time. The AVX2 versions compute the same float terms and add them
 * in 8 double lanes: the same sums up to the order of the additions (tested against the
 * scalar ones). */
typedef struct {
    double s, s2;
} bn_sums;

static double plane_sum_ref(const float *p, int64_t n) { return ql_sum(p, n); }
static double plane_sqdev_ref(const float *p, int64_t n, double mu) {
    double s2 = 0;
    for (int64_t i = 0; i < n; i++) { double d = p[i] - mu; s2 += d * d; }
    return s2;
}
/* sum dy and sum dy * xhat, xhat = (x - m) * rs in float as the dx pass computes it */
static bn_sums plane_bwd_sums_ref(const float *x, const float *dy, int64_t n, float m, float rs) {
    bn_sums r = {0, 0};
    for (int64_t i = 0; i < n; i++) {
        float xhat = (x[i] - m) * rs;
        r.s += dy[i];
        r.s2 += dy[i] * xhat;
    }
    return r;
}

__attribute__((target("avx2,fma"))) static inline __m256d lo4(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
__attribute__((target("avx2,fma"))) static inline __m256d hi4(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
__attribute__((target("avx2,fma"))) static inline double hsum4(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

__attribute__((target("avx2,fma"))) static double plane_sum_avx2(const float *p, int64_t n) {
    __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(p + i);
        a = _mm256_add_pd(a, lo4(v));
        b = _mm256_add_pd(b, hi4(v));
    }
    double s = hsum4(_mm256_add_pd(a, b));
    for (; i < n; i++) s += p[i];
    return s;
}

__attribute__((target("avx2,fma"))) static double plane_sqdev_avx2(const float *p, int64_t n, double mu) {
    __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd(), vm = _mm256_set1_pd(mu);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(p + i);
        __m256d d0 = _mm256_sub_pd(lo4(v), vm), d1 = _mm256_sub_pd(hi4(v), vm);
        a = _mm256_add_pd(a, _mm256_mul_pd(d0, d0));
        b = _mm256_add_pd(b, _mm256_mul_pd(d1, d1));
    }
    double s2 = hsum4(_mm256_add_pd(a, b));
    for (; i < n; i++) { double d = p[i] - mu; s2 += d * d; }
    return s2;
}

__attribute__((target("avx2,fma"))) static bn_sums plane_bwd_sums_avx2(const float *x, const float *dy, int64_t n, float m, float rs) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, t0 = s0, t1 = s0;
    __m256 vm = _mm256_set1_ps(m), vr = _mm256_set1_ps(rs);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(dy + i);
        /* (x - m) * rs, then dy * xhat: two roundings, as the scalar loop (no FMA contraction) */
        __m256 prod = _mm256_mul_ps(g, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vr));
        s0 = _mm256_add_pd(s0, lo4(g));
        s1 = _mm256_add_pd(s1, hi4(g));
        t0 = _mm256_add_pd(t0, lo4(prod));
        t1 = _mm256_add_pd(t1, hi4(prod));
    }
    bn_sums r = {hsum4(_mm256_add_pd(s0, s1)), hsum4(_mm256_add_pd(t0, t1))};
    bn_sums tail = plane_bwd_sums_ref(x + i, dy + i, n - i, m, rs);
    r.s += tail.s;
    r.s2 += tail.s2;
    return r;
}

static void channel_stats_range(int avx2, float *mean, float *var, const float *x, int N, int C, int64_t HW, int c0, int c1) {
    double M = (double)N * HW;
    for (int c = c0; c < c1; c++) {
        double s = 0;
        for (int n = 0; n < N; n++) {
            const float *p = x + ((int64_t)n * C + c) * HW;
            s += avx2 ? plane_sum_avx2(p, HW) : plane_sum_ref(p, HW);
        }
        double mu = M > 0 ? s / M : 0, s2 = 0;
        for (int n = 0; n < N; n++) {
            const float *p = x + ((int64_t)n * C + c) * HW;
            s2 += avx2 ? plane_sqdev_avx2(p, HW, mu) : plane_sqdev_ref(p, HW, mu);
        }
        mean[c] = (float)mu;
        var[c] = M > 0 ? (float)(s2 / M) : 0.0f;
    }
}
static void batch_norm_apply_range(float *y, const float *x, const float *mean, const float *rstd,
                                   const float *gamma, const float *beta, int N, int C, int64_t HW, int c0, int c1) {
    for (int n = 0; n < N; n++)
        for (int c = c0; c < c1; c++) {
            float a = rstd[c] * (gamma ? gamma[c] : 1.0f);
            float b = (beta ? beta[c] : 0.0f) - mean[c] * a;
            int64_t off = ((int64_t)n * C + c) * HW;
            for (int64_t i = 0; i < HW; i++) y[off + i] = x[off + i] * a + b;
        }
}

static void batch_norm_bwd_range(int avx2, int overwrite, float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                                 const float *mean, const float *rstd, const float *gamma, int N, int C,
                                 int64_t HW, int c0, int c1) {
    double M = (double)N * HW;
    for (int c = c0; c < c1; c++) {
        float m = mean[c], rs = rstd[c], gm = gamma ? gamma[c] : 1.0f;
        double sum_dy = 0, sum_dy_xhat = 0;
        for (int n = 0; n < N; n++) {
            int64_t off = ((int64_t)n * C + c) * HW;
            bn_sums p = avx2 ? plane_bwd_sums_avx2(x + off, dy + off, HW, m, rs) : plane_bwd_sums_ref(x + off, dy + off, HW, m, rs);
            sum_dy += p.s;
            sum_dy_xhat += p.s2;
        }
        if (dgamma) dgamma[c] += (float)sum_dy_xhat;
        if (dbeta) dbeta[c] += (float)sum_dy;
        if (!dx) continue;
        float a = (float)(sum_dy / M), b = (float)(sum_dy_xhat / M), k = gm * rs;
        for (int n = 0; n < N; n++) {
            int64_t off = ((int64_t)n * C + c) * HW;
            for (int64_t i = 0; i < HW; i++) {
                float xhat = (x[off + i] - m) * rs;
                /* written (overwrite): 0 + v, as adding to a zero-filled dx would give */
                dx[off + i] = (overwrite ? 0.0f : dx[off + i]) + k * (dy[off + i] - a - xhat * b);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Pooling and upsampling                                                                    */
/* ---------------------------------------------------------------------------------------- */
static inline int pool_out(int H, int K, int S, int P) { return (H + 2 * P - K) / S + 1; }

static void max_pool_planes(float *y, int32_t *argmax, const float *x, int64_t p0, int64_t p1, int H, int W,
                            int KH, int KW, int SH, int SW, int PH, int PW) {
    int OH = pool_out(H, KH, SH, PH), OW = pool_out(W, KW, SW, PW);
    for (int64_t p = p0; p < p1; p++) {
        const float *xp = x + p * H * W;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float best = -INFINITY;
                int32_t bi = -1;
                for (int kh = 0; kh < KH; kh++) {
                    int ih = oh * SH - PH + kh;
                    if (ih < 0 || ih >= H) continue;
                    for (int kw = 0; kw < KW; kw++) {
                        int iw = ow * SW - PW + kw;
                        if (iw < 0 || iw >= W) continue;
                        float v = xp[ih * W + iw];
                        if (bi < 0) bi = ih * W + iw;
                        if (v > best) { best = v; bi = ih * W + iw; }
                    }
                }
                int64_t o = (p * OH + oh) * OW + ow;
                y[o] = best;
                if (argmax) argmax[o] = bi;
            }
    }
}

/* The same maxima without their indices (inference): max over a window = max over its rows of
 * the max along each row, so each input row is reduced along kw once for all the windows that
 * read it, then kh rows of those are reduced per output row: KH + KW comparisons per output
 * instead of KH * KW, in loops over adjacent outputs the compiler vectorizes. The rule is the
 * indexed loop's (best = v > best ? v : best from -inf), which ignores NaN and is exact in any
 * order, so the values are the same bits. */
static _Thread_local ql_scratch tl_pool_rows;

static void max_pool_planes_values(float *y, const float *x, int64_t p0, int64_t p1, int H, int W, int KH, int KW,
                                   int SH, int SW, int PH, int PW) {
    int OH = pool_out(H, KH, SH, PH), OW = pool_out(W, KW, SW, PW);
    float *rows = (float *)ql_scratch_reserve(&tl_pool_rows, sizeof(float) * (size_t)H * OW);
    if (!rows) {
        max_pool_planes(y, NULL, x, p0, p1, H, W, KH, KW, SH, SW, PH, PW);
        return;
    }
    for (int64_t p = p0; p < p1; p++) {
        const float *xp = x + p * H * W;
        for (int ih = 0; ih < H; ih++) {
            const float *xr = xp + (size_t)ih * W;
            float *r = rows + (size_t)ih * OW;
            for (int ow = 0; ow < OW; ow++) r[ow] = -INFINITY;
            for (int kw = 0; kw < KW; kw++) {
                /* outputs whose tap kw falls inside the row: 0 <= ow*SW - PW + kw < W */
                int last = W - 1 + PW - kw; /* ow * SW <= last */
                int lo = ql_max_i(0, (PW - kw + SW - 1) / SW), hi = last < 0 ? 0 : ql_min_i(OW, last / SW + 1);
                const float *src = xr + (ptrdiff_t)lo * SW - PW + kw;
                if (SW == 1)
                    for (int ow = lo; ow < hi; ow++) { float v = src[ow - lo]; r[ow] = v > r[ow] ? v : r[ow]; }
                else
                    for (int ow = lo; ow < hi; ow++) { float v = src[(ptrdiff_t)(ow - lo) * SW]; r[ow] = v > r[ow] ? v : r[ow]; }
            }
        }
        for (int oh = 0; oh < OH; oh++) {
            float *yo = y + (p * OH + oh) * OW;
            for (int ow = 0; ow < OW; ow++) yo[ow] = -INFINITY;
            for (int kh = 0; kh < KH; kh++) {
                int ih = oh * SH - PH + kh;
                if (ih < 0 || ih >= H) continue;
                const float *r = rows + (size_t)ih * OW;
                for (int ow = 0; ow < OW; ow++) yo[ow] = r[ow] > yo[ow] ? r[ow] : yo[ow];
            }
        }
    }
}

typedef struct {
    float *y;
    int32_t *argmax;
    const float *x;
    int64_t planes;
    int H, W, KH, KW, SH, SW, PH, PW, tasks;
} max_pool_job;

static void max_pool_task(int t, void *p) {
    const max_pool_job *j = (const max_pool_job *)p;
    int64_t p0 = t * j->planes / j->tasks, p1 = (t + 1) * j->planes / j->tasks;
    if (j->argmax) max_pool_planes(j->y, j->argmax, j->x, p0, p1, j->H, j->W, j->KH, j->KW, j->SH, j->SW, j->PH, j->PW);
    else max_pool_planes_values(j->y, j->x, p0, p1, j->H, j->W, j->KH, j->KW, j->SH, j->SW, j->PH, j->PW);
}

/* Planes split between the threads (each plane's windows are independent). */
void ql_max_pool2d_fwd(float *y, int32_t *argmax, const float *x, int64_t planes, int H, int W,
                       int KH, int KW, int SH, int SW, int PH, int PW) {
    int64_t work = planes * H * W * KH * KW;
    int tasks = work < (1 << 16) ? 1 : (int)(planes < 4 * ql_get_num_threads() ? planes : 4 * ql_get_num_threads());
    if (tasks < 1) tasks = 1;
    max_pool_job j = {y, argmax, x, planes, H, W, KH, KW, SH, SW, PH, PW, tasks};
    ql_parallel_for(tasks, max_pool_task, &j);
}

void ql_max_pool2d_bwd(float *dx, const float *dy, const int32_t *argmax, int64_t planes, int H,
                       int W, int OH, int OW) {
    for (int64_t p = 0; p < planes; p++)
        for (int64_t i = 0; i < (int64_t)OH * OW; i++) {
            int32_t a = argmax[p * OH * OW + i];
            if (a >= 0) dx[p * H * W + a] += dy[p * OH * OW + i];
        }
}

static inline int avg_count(int oh, int ow, int H, int W, int KH, int KW, int SH, int SW, int PH,
                            int PW, int include_pad) {
    if (include_pad) return KH * KW;
    int h0 = oh * SH - PH, w0 = ow * SW - PW;
    int h1 = ql_min_i(h0 + KH, H), w1 = ql_min_i(w0 + KW, W);
    h0 = ql_max_i(h0, 0);
    w0 = ql_max_i(w0, 0);
    return ql_max_i((h1 - h0) * (w1 - w0), 1);
}

void ql_avg_pool2d_fwd(float *y, const float *x, int64_t planes, int H, int W, int KH, int KW,
                       int SH, int SW, int PH, int PW, int count_include_pad) {
    int OH = pool_out(H, KH, SH, PH), OW = pool_out(W, KW, SW, PW);
    for (int64_t p = 0; p < planes; p++) {
        const float *xp = x + p * H * W;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float s = 0.0f;
                for (int kh = 0; kh < KH; kh++) {
                    int ih = oh * SH - PH + kh;
                    if (ih < 0 || ih >= H) continue;
                    for (int kw = 0; kw < KW; kw++) {
                        int iw = ow * SW - PW + kw;
                        if (iw >= 0 && iw < W) s += xp[ih * W + iw];
                    }
                }
                y[(p * OH + oh) * OW + ow] = s / (float)avg_count(oh, ow, H, W, KH, KW, SH, SW, PH, PW, count_include_pad);
            }
    }
}

void ql_avg_pool2d_bwd(float *dx, const float *dy, int64_t planes, int H, int W, int KH, int KW,
                       int SH, int SW, int PH, int PW, int count_include_pad) {
    int OH = pool_out(H, KH, SH, PH), OW = pool_out(W, KW, SW, PW);
    for (int64_t p = 0; p < planes; p++) {
        float *dxp = dx + p * H * W;
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float g = dy[(p * OH + oh) * OW + ow] /
                          (float)avg_count(oh, ow, H, W, KH, KW, SH, SW, PH, PW, count_include_pad);
                for (int kh = 0; kh < KH; kh++) {
                    int ih = oh * SH - PH + kh;
                    if (ih < 0 || ih >= H) continue;
                    for (int kw = 0; kw < KW; kw++) {
                        int iw = ow * SW - PW + kw;
                        if (iw >= 0 && iw < W) dxp[ih * W + iw] += g;
                    }
                }
            }
    }
}

void ql_upsample_nearest_fwd(float *restrict y, const float *restrict x, int64_t planes, int H,
                             int W, int FH, int FW) {
    int OH = H * FH, OW = W * FW;
    for (int64_t p = 0; p < planes; p++)
        for (int oh = 0; oh < OH; oh++) {
            const float *xr = x + (p * H + oh / FH) * W;
            float *yr = y + (p * OH + oh) * OW;
            for (int ow = 0; ow < OW; ow++) yr[ow] = xr[ow / FW];
        }
}

void ql_upsample_nearest_bwd(float *restrict dx, const float *restrict dy, int64_t planes, int H,
                             int W, int FH, int FW) {
    int OH = H * FH, OW = W * FW;
    for (int64_t p = 0; p < planes; p++)
        for (int oh = 0; oh < OH; oh++) {
            float *xr = dx + (p * H + oh / FH) * W;
            const float *yr = dy + (p * OH + oh) * OW;
            for (int ow = 0; ow < OW; ow++) xr[ow / FW] += yr[ow];
        }
}

/* ---------------------------------------------------------------------------------------- */
/* Losses and optimizers                                                                     */
/* ---------------------------------------------------------------------------------------- */
void ql_bce_logits_fwd(float *restrict loss, const float *restrict z, const float *restrict t,
                       int64_t n) {
    for (int64_t i = 0; i < n; i++)
        loss[i] = (z[i] > 0.0f ? z[i] : 0.0f) - z[i] * t[i] + log1pf(expf(-fabsf(z[i])));
}

void ql_bce_logits_bwd(float *restrict dz, const float *restrict dloss, const float *restrict z,
                       const float *restrict t, int64_t n) {
    for (int64_t i = 0; i < n; i++) dz[i] += dloss[i] * (sigmoidf_stable(z[i]) - t[i]);
}

void ql_sgd_update(float *restrict p, float *restrict buf, const float *restrict grad, int64_t n,
                   float lr, float momentum, float weight_decay, int nesterov, int first_step) {
    for (int64_t i = 0; i < n; i++) {
        float g = grad[i] + weight_decay * p[i];
        float d = g;
        if (momentum != 0.0f) {
            float b = first_step ? g : momentum * buf[i] + g;
            buf[i] = b;
            d = nesterov ? g + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}

void ql_adamw_update(float *restrict p, float *restrict m, float *restrict v,
                     const float *restrict grad, int64_t n, float lr, float beta1, float beta2,
                     float eps, float weight_decay, int64_t step) {
    float bc1 = 1.0f - powf(beta1, (float)step), bc2 = 1.0f - powf(beta2, (float)step);
    float decay = 1.0f - lr * weight_decay;
    for (int64_t i = 0; i < n; i++) {
        float g = grad[i];
        p[i] *= decay;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        p[i] -= lr * (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Parallel entry points: the serial loops above, split over channels or contiguous chunks.  */
/* Each output element is computed by exactly one task in the same order as serially, so     */
/* results do not depend on the thread count.                                                */
/* ---------------------------------------------------------------------------------------- */
#define CHUNK (1 << 15)

typedef struct {
    int op;
    float *a;
    const float *b, *c, *d;
    int64_t n;
    int overwrite; /* backward: dx is written, not added to (its old contents are not read) */
    int avx2;      /* the AVX2 loops below where an op has one */
} chunk_job;

/* Sigmoid and SiLU, forward and SiLU's backward, 8 at a time with ql_sigmoid8: the scalar
 * loops' operations in the same order, so the same bits (tested); the tails run the scalar
 * loops. The scalar loops call the exponential once per element (libm's expf took ~40% of
 * the time that PyTorch's vectorised SiLU takes in all). */
__attribute__((target("avx2,fma"))) static int64_t logistic_fwd_avx2(ql_unary_op op, float *y, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), s = ql_sigmoid8(v);
        _mm256_storeu_ps(y + i, op == QL_UNARY_SILU ? _mm256_mul_ps(v, s) : s);
    }
    return i;
}

/* dx = [dx or 0] + dy * s * (1 + x * (1 - s)), evaluated as ((dy * s) * (1 + (x * (1 - s)))) */
__attribute__((target("avx2,fma"))) static int64_t silu_bwd_avx2(float *dx, const float *dy, const float *x, int64_t n, int overwrite) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), s = ql_sigmoid8(v);
        __m256 u = _mm256_add_ps(one, _mm256_mul_ps(v, _mm256_sub_ps(one, s)));
        __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + i), s), u);
        /* written: 0 + g, as the scalar loop adds to the zeroed chunk (-0 becomes +0) */
        _mm256_storeu_ps(dx + i, _mm256_add_ps(overwrite ? _mm256_setzero_ps() : _mm256_loadu_ps(dx + i), g));
    }
    return i;
}

static int chunks_for(int64_t n) { return (int)((n + CHUNK - 1) / CHUNK); }

typedef struct {
    ql_binary_op op;
    float *out;
    const float *a, *b;
    int64_t n;
} dense_binary_job;

static void dense_binary_task(int t, void *p) {
    const dense_binary_job *j = (const dense_binary_job *)p;
    int64_t lo = (int64_t)t * CHUNK, len = j->n - lo < CHUNK ? j->n - lo : CHUNK;
    float *o = j->out + lo;
    const float *a = j->a + lo, *b = j->b + lo;
    switch (j->op) { /* the common cases as separate loops, so that they vectorise */
    case QL_BINARY_ADD: for (int64_t i = 0; i < len; i++) o[i] = a[i] + b[i]; break;
    case QL_BINARY_MUL: for (int64_t i = 0; i < len; i++) o[i] = a[i] * b[i]; break;
    default: for (int64_t i = 0; i < len; i++) o[i] = binop(j->op, a[i], b[i]);
    }
}

static void binary_dense(ql_binary_op op, float *out, const float *a, const float *b, int64_t n) {
    dense_binary_job j = {op, out, a, b, n};
    ql_parallel_for(chunks_for(n), dense_binary_task, &j);
}

static void unary_fwd_task(int t, void *p) {
    chunk_job *j = (chunk_job *)p;
    int64_t lo = (int64_t)t * CHUNK, len = j->n - lo < CHUNK ? j->n - lo : CHUNK;
    if (j->avx2 && (j->op == QL_UNARY_SILU || j->op == QL_UNARY_SIGMOID)) {
        int64_t done = logistic_fwd_avx2((ql_unary_op)j->op, j->a + lo, j->b + lo, len);
        lo += done;
        len -= done;
    }
    unary_fwd_serial((ql_unary_op)j->op, j->a + lo, j->b + lo, len);
}

/* ReLU's backward, 8 at a time: dx = [dx or +0] + (x > 0 ? dy : +0), the scalar loop's
 * operations in the same order (so the same bits, -0 and NaN included). The scalar loop compiles
 * to a branch per element, and half of them mispredict on a ReLU's inputs: it took 15x the
 * forward's time in a training step. */
__attribute__((target("avx2"))) static void relu_bwd_avx2(float *restrict dx, const float *restrict dy,
                                                         const float *restrict x, int64_t n, int overwrite) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 pass = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), zero, _CMP_GT_OQ), _mm256_loadu_ps(dy + i));
        _mm256_storeu_ps(dx + i, _mm256_add_ps(overwrite ? zero : _mm256_loadu_ps(dx + i), pass));
    }
    for (; i < n; i++) dx[i] = (overwrite ? 0.0f : dx[i]) + (x[i] > 0.0f ? dy[i] : 0.0f);
}

static void unary_bwd_task(int t, void *p) {
    chunk_job *j = (chunk_job *)p;
    int64_t lo = (int64_t)t * CHUNK, len = j->n - lo < CHUNK ? j->n - lo : CHUNK;
    if (j->op == QL_UNARY_RELU && j->avx2) {
        relu_bwd_avx2(j->a + lo, j->b + lo, j->c + lo, len, j->overwrite);
        return;
    }
    if (j->op == QL_UNARY_SILU && j->avx2) {
        int64_t done = silu_bwd_avx2(j->a + lo, j->b + lo, j->c + lo, len, j->overwrite);
        lo += done;
        len -= done;
    }
    /* overwrite: zero the chunk here, where it is about to be used (in cache), rather than
     * in a separate pass over the whole array */
    if (j->overwrite) memset(j->a + lo, 0, sizeof(float) * (size_t)len);
    unary_bwd_serial((ql_unary_op)j->op, j->a + lo, j->b + lo, j->c + lo, j->d ? j->d + lo : NULL, len);
}

int ql_unary_fwd_isa(ql_isa isa, ql_unary_op op, float *y, const float *x, int64_t n) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    chunk_job j = {op, y, x, NULL, NULL, n, 0, level >= QL_ISA_AVX2};
    ql_parallel_for(chunks_for(n), unary_fwd_task, &j);
    return QL_OK;
}

void ql_unary_fwd(ql_unary_op op, float *y, const float *x, int64_t n) { ql_unary_fwd_isa(QL_ISA_BEST, op, y, x, n); }

int ql_unary_bwd_into_isa(ql_isa isa, ql_unary_op op, float *restrict dx, const float *restrict dy,
                          const float *restrict x, const float *restrict y, int64_t n, int accumulate) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    chunk_job j = {op, dx, dy, x, y, n, !accumulate, level >= QL_ISA_AVX2};
    ql_parallel_for(chunks_for(n), unary_bwd_task, &j);
    return QL_OK;
}

void ql_unary_bwd_into(ql_unary_op op, float *restrict dx, const float *restrict dy,
                       const float *restrict x, const float *restrict y, int64_t n, int accumulate) {
    ql_unary_bwd_into_isa(QL_ISA_BEST, op, dx, dy, x, y, n, accumulate);
}

void ql_unary_bwd(ql_unary_op op, float *restrict dx, const float *restrict dy,
                  const float *restrict x, const float *restrict y, int64_t n) {
    ql_unary_bwd_into(op, dx, dy, x, y, n, 1);
}

typedef struct {
    float *o1, *o2, *o3;
    const float *x, *dy, *mean, *rstd, *gamma, *beta;
    int N, C, tasks;
    int64_t HW;
    int avx2;      /* the sums' AVX2 loops (batch norm's statistics and backward) */
    int overwrite; /* backward: dx is written, its old contents not read */
} channel_job;

static void channel_range(const channel_job *j, int t, int *c0, int *c1) {
    *c0 = (int)((int64_t)t * j->C / j->tasks);
    *c1 = (int)((int64_t)(t + 1) * j->C / j->tasks);
}

static int channel_tasks(int C, int N, int64_t HW) {
    int64_t work = (int64_t)N * C * HW;
    int t = work < CHUNK ? 1 : ql_get_num_threads() * 2;
    return t > C ? C : t;
}

static void stats_task(int t, void *p) {
    channel_job *j = (channel_job *)p;
    int c0, c1;
    channel_range(j, t, &c0, &c1);
    channel_stats_range(j->avx2, j->o1, j->o2, j->x, j->N, j->C, j->HW, c0, c1);
}

static void apply_task(int t, void *p) {
    channel_job *j = (channel_job *)p;
    int c0, c1;
    channel_range(j, t, &c0, &c1);
    batch_norm_apply_range(j->o1, j->x, j->mean, j->rstd, j->gamma, j->beta, j->N, j->C, j->HW, c0, c1);
}

static void bn_bwd_task(int t, void *p) {
    channel_job *j = (channel_job *)p;
    int c0, c1;
    channel_range(j, t, &c0, &c1);
    batch_norm_bwd_range(j->avx2, j->overwrite, j->o1, j->o2, j->o3, j->dy, j->x, j->mean, j->rstd, j->gamma, j->N, j->C, j->HW, c0, c1);
}

int ql_channel_stats_isa(ql_isa isa, float *mean, float *var, const float *x, int N, int C, int64_t HW) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    channel_job j = {mean, var, NULL, x, NULL, NULL, NULL, NULL, NULL, N, C, channel_tasks(C, N, HW), HW, level >= QL_ISA_AVX2, 0};
    ql_parallel_for(j.tasks, stats_task, &j);
    return QL_OK;
}

void ql_channel_stats(float *mean, float *var, const float *x, int N, int C, int64_t HW) {
    ql_channel_stats_isa(QL_ISA_BEST, mean, var, x, N, C, HW);
}

void ql_batch_norm_apply(float *y, const float *x, const float *mean, const float *rstd,
                         const float *gamma, const float *beta, int N, int C, int64_t HW) {
    channel_job j = {y, NULL, NULL, x, NULL, mean, rstd, gamma, beta, N, C, channel_tasks(C, N, HW), HW, 0, 0};
    ql_parallel_for(j.tasks, apply_task, &j);
}

int ql_batch_norm_bwd_isa(ql_isa isa, float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                          const float *mean, const float *rstd, const float *gamma, int N, int C, int64_t HW,
                          int accumulate) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    channel_job j = {dx, dgamma, dbeta, x, dy, mean, rstd, gamma, NULL, N, C, channel_tasks(C, N, HW), HW, level >= QL_ISA_AVX2,
                     !accumulate};
    ql_parallel_for(j.tasks, bn_bwd_task, &j);
    return QL_OK;
}

void ql_batch_norm_bwd(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                       const float *mean, const float *rstd, const float *gamma, int N, int C,
                       int64_t HW) {
    ql_batch_norm_bwd_isa(QL_ISA_BEST, dx, dgamma, dbeta, dy, x, mean, rstd, gamma, N, C, HW, 1);
}
