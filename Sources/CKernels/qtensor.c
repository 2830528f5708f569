/* INT8 activation tensors of the engine (contracts in ckernels.h).
 *
 * The engine keeps quantized activations as signed int8 codes in NHWC order: a conv computed
 * as a GEMM with one row per output pixel and one column per output channel writes exactly
 * that layout, and the next conv's im2col reads each tap's channels as one contiguous run.
 * Codes follow TensorRT's symmetric convention, the fake quantizer's exactly:
 *   s = amax / qmax,  code = clamp(round_half_to_even(x / s), -qmax, qmax),  x' = code * s. */
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "internal.h"

typedef struct {
    int8_t *out;
    const float *x;
    int C, HW;
    int chunk, chunks; /* pixels a task quantizes (a multiple of 8), tasks per image */
    float s, lim;
} quantize_job;

/* 8 codes of ql_code at once: the same IEEE division, round half to even (_mm256_round_ps
 * with the nearest mode is nearbyintf's default), the same clamp; so the same bits. */
__attribute__((target("avx2"))) static inline __m256i codes8_avx2(const float *x, __m256 s, __m256 lim) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    return _mm256_cvtps_epi32(q);
}

/* Pixels [px, end) of one image, 8 at a time: each channel's 8 codes, then written to their
 * NHWC places. */
__attribute__((target("avx2"))) static void quantize_pixels_avx2(const quantize_job *j, const float *x, int8_t *o, int px, int end) {
    const __m256 s = _mm256_set1_ps(j->s), lim = _mm256_set1_ps(j->lim);
    const int C = j->C, HW = j->HW;
    for (; px + 8 <= end; px += 8)
        for (int c = 0; c < C; c++) {
            int32_t q[8];
            _mm256_storeu_si256((__m256i *)q, codes8_avx2(x + (size_t)c * HW + px, s, lim));
            for (int i = 0; i < 8; i++) o[(size_t)(px + i) * C + c] = (int8_t)q[i];
        }
    for (; px < end; px++)
        for (int c = 0; c < C; c++) o[(size_t)px * C + c] = (int8_t)ql_code(x[(size_t)c * HW + px], j->s, j->lim);
}

/* Task t: pixels [chunk * (t % chunks), ...) of image t / chunks, pixel by pixel, their C
 * channels (strided reads, contiguous writes). */
static void quantize_task(int t, void *p) {
    const quantize_job *j = (const quantize_job *)p;
    int n = t / j->chunks, px = (t % j->chunks) * j->chunk, end = ql_min_i(j->HW, px + j->chunk);
    const float *x = j->x + (size_t)n * j->C * j->HW;
    int8_t *o = j->out + (size_t)n * j->HW * j->C;
    if (ql_resolve_isa(QL_ISA_BEST) >= QL_ISA_AVX2) {
        quantize_pixels_avx2(j, x, o, px, end);
        return;
    }
    for (; px < end; px++)
        for (int c = 0; c < j->C; c++) o[(size_t)px * j->C + c] = (int8_t)ql_code(x[(size_t)c * j->HW + px], j->s, j->lim);
}

void ql_quantize_nchw_to_nhwc_s8(int8_t *restrict out, const float *restrict x, int N, int C, int HW,
                                 float amax, int qmax) {
    if (!(amax > 0.0f)) {
        memset(out, 0, (size_t)N * C * HW);
        return;
    }
    /* tasks of at least 2^15 values; one image split between the threads when the batch is
     * smaller than their number (a batch-1 input: the stem's quantize step) */
    int threads = ql_get_num_threads();
    long values = (long)C * HW;
    int chunks = N >= threads ? 1 : (int)ql_max_i(1, ql_min_i((threads + N - 1) / N * 2, (int)(values >> 15)));
    int chunk = (HW + chunks - 1) / chunks;
    chunk = (chunk + 7) / 8 * 8;
    quantize_job j = {out, x, C, HW, chunk, (HW + chunk - 1) / chunk, amax / (float)qmax, (float)qmax};
    if ((size_t)N * C * HW < (1 << 16))
        for (int t = 0; t < N * j.chunks; t++) quantize_task(t, &j);
    else
        ql_parallel_for(N * j.chunks, quantize_task, &j);
}

__attribute__((target("avx2"))) static int64_t quantize_flat_avx2(int8_t *out, const float *x, int64_t n, float s, float lim) {
    const __m256 vs = _mm256_set1_ps(s), vl = _mm256_set1_ps(lim);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i q = codes8_avx2(x + i, vs, vl);
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)); /* |code| <= lim: no saturation */
        _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(w, w));
    }
    return i;
}

void ql_quantize_s8(int8_t *restrict out, const float *restrict x, int64_t n, float amax, int qmax) {
    if (!(amax > 0.0f)) {
        memset(out, 0, (size_t)n);
        return;
    }
    float s = amax / (float)qmax, lim = (float)qmax;
    int64_t i = ql_resolve_isa(QL_ISA_BEST) >= QL_ISA_AVX2 && qmax <= 127 ? quantize_flat_avx2(out, x, n, s, lim) : 0;
    for (; i < n; i++) out[i] = (int8_t)ql_code(x[i], s, lim);
}

void ql_dequantize_nhwc_to_nchw_f32(float *restrict out, const int8_t *restrict q, int N, int C, int HW,
                                   float scale) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            float *oc = out + ((size_t)n * C + c) * HW;
            const int8_t *qc = q + (size_t)n * HW * C + c;
            for (int p = 0; p < HW; p++) oc[p] = (float)qc[(size_t)p * C] * scale;
        }
}

int ql_s8_min(const int8_t *x, int64_t n) {
    int m = 127;
    for (int64_t i = 0; i < n; i++) m = x[i] < m ? x[i] : m;
    return m;
}

typedef struct {
    uint8_t *col;
    const int8_t *x;
    const ql_conv_geom *g;
    int OH, OW, offset, rows_per_task;
} im2col_job;

/* Rows [t * rows_per_task, ...) of the im2col matrix (one row per output pixel). */
static void im2col_rows(int t, void *p) {
    const im2col_job *j = (const im2col_job *)p;
    const ql_conv_geom *g = j->g;
    const int C = g->C, H = g->H, W = g->W, OH = j->OH, OW = j->OW;
    const size_t row = (size_t)g->KH * g->KW * C;
    const uint8_t pad = (uint8_t)j->offset; /* the code 0, shifted */
    int total = g->N * OH * OW, r0 = t * j->rows_per_task, r1 = r0 + j->rows_per_task;
    if (r1 > total) r1 = total;
    for (int r = r0; r < r1; r++) {
        int n = r / (OH * OW), oh = (r / OW) % OH, ow = r % OW;
        uint8_t *dst = j->col + (size_t)r * row;
        for (int kh = 0; kh < g->KH; kh++) {
            int ih = oh * g->SH - g->PH + kh * g->DH;
            for (int kw = 0; kw < g->KW; kw++, dst += C) {
                int iw = ow * g->SW - g->PW + kw * g->DW;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                    memset(dst, pad, (size_t)C);
                    continue;
                }
                const int8_t *src = j->x + (((size_t)n * H + ih) * W + iw) * C;
                if (j->offset == 0)
                    for (int c = 0; c < C; c++) dst[c] = (uint8_t)src[c]; /* non-negative codes: the same bytes */
                else
                    for (int c = 0; c < C; c++) dst[c] = (uint8_t)(src[c] + 128);
            }
        }
    }
}

int ql_im2col_nhwc_s8u8(uint8_t *restrict col, const int8_t *restrict x, const ql_conv_geom *g, int offset) {
    int OH, OW;
    if (!g || !col || !x || g->groups != 1 || ql_conv_out_size(g, &OH, &OW) != QL_OK || (offset != 0 && offset != 128)) return QL_EINVAL;
    int total = g->N * OH * OW;
    size_t bytes = (size_t)total * g->KH * g->KW * g->C;
    int tasks = bytes < (1 << 18) ? 1 : ql_get_num_threads() * 4;
    if (tasks > total) tasks = total > 0 ? total : 1;
    im2col_job j = {col, x, g, OH, OW, offset, (total + tasks - 1) / tasks};
    ql_parallel_for(tasks, im2col_rows, &j);
    return QL_OK;
}

void ql_requantize_codes_s8(int8_t *restrict out, const int8_t *restrict in, int64_t n, float scale_in, float amax_out, int qmax) {
    if (!(amax_out > 0.0f)) {
        memset(out, 0, (size_t)n);
        return;
    }
    float s = amax_out / (float)qmax, lim = (float)qmax;
    /* the value the simulator's first quantizer left, and what its second one does with it */
    for (int64_t i = 0; i < n; i++) out[i] = (int8_t)ql_code((float)in[i] * scale_in, s, lim);
}

int ql_maxpool_nhwc_s8(int8_t *restrict out, const int8_t *restrict x, int N, int H, int W, int C, int k, int stride, int pad) {
    if (k < 1 || stride < 1 || pad < 0 || pad > k / 2) return QL_EINVAL;
    int OH = (H + 2 * pad - k) / stride + 1, OW = (W + 2 * pad - k) / stride + 1;
    if (OH < 1 || OW < 1) return QL_EINVAL;
    for (int n = 0; n < N; n++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int8_t *o = out + (((size_t)n * OH + oh) * OW + ow) * C;
                for (int c = 0; c < C; c++) o[c] = -128;
                for (int i = 0; i < k; i++) {
                    int ih = oh * stride - pad + i;
                    if (ih < 0 || ih >= H) continue; /* padding never wins: as -inf */
                    for (int j = 0; j < k; j++) {
                        int iw = ow * stride - pad + j;
                        if (iw < 0 || iw >= W) continue;
                        const int8_t *src = x + (((size_t)n * H + ih) * W + iw) * C;
                        for (int c = 0; c < C; c++) o[c] = src[c] > o[c] ? src[c] : o[c];
                    }
                }
            }
    return QL_OK;
}

void ql_pad_channels_nhwc_s8(int8_t *restrict out, const int8_t *restrict x, int64_t pixels, int C, int Cp) {
    if (C == 3 && Cp == 4) { /* the image: one 32-bit word per pixel (the byte loop took longer than the conv) */
        for (int64_t p = 0; p < pixels; p++) {
            const uint8_t *s = (const uint8_t *)x + 3 * p;
            uint32_t w = (uint32_t)s[0] | (uint32_t)s[1] << 8 | (uint32_t)s[2] << 16;
            memcpy(out + 4 * p, &w, 4);
        }
        return;
    }
    for (int64_t p = 0; p < pixels; p++) {
        memcpy(out + p * Cp, x + p * C, (size_t)C);
        memset(out + p * Cp + C, 0, (size_t)(Cp - C));
    }
}

void ql_concat_channels_nhwc_s8(int8_t *restrict out, const int8_t *const *inputs, const int *channels, int count, int64_t pixels) {
    int total = 0;
    for (int i = 0; i < count; i++) total += channels[i];
    for (int64_t p = 0; p < pixels; p++) {
        int8_t *o = out + p * total;
        for (int i = 0; i < count; i++) {
            memcpy(o, inputs[i] + p * channels[i], (size_t)channels[i]);
            o += channels[i];
        }
    }
}
