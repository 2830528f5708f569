/* Direct FP32 convolution (AVX2): the conv's GEMM without packing the image, for the forward
 * and both gradients.
 *
 * The implicit GEMM in conv.c computes y_g = W_g (Kg x KK) times the im2col matrix (KK x P),
 * packing 16-pixel panels of that matrix from the image for every slab: a copy of KK x P floats
 * (KH*KW times the image) per call, which on 3x3 convs of few channels costs a good part of the
 * product. Here the roles turn round: the micro-kernel's vector operand is 16 output channels
 * of the weights (packed once, KK x 16 per block), and its broadcast operand is 6 output
 * pixels read straight from a zero-padded NHWC copy of the image: the value at tap k = (c, kh,
 * kw) of pixel p is xp[p's base + off[k]], one offset table for every pixel. No matrix is
 * packed; the only copy is the NCHW -> padded NHWC one, the size of the image.
 *
 * Each element's sum is the GEMM's: over KC-deep slabs of k in increasing order, fused
 * multiply-adds from zero within a slab, the slab added to the running value (which starts as
 * the bias, or as the first slab). So the output is the bits of conv.c's im2col + SGEMM path,
 * and conv.c uses this path where it applies (AVX2, one group, not pointwise: a 1x1 conv's
 * GEMM reads the image as it is), for any batch.
 *
 * The same tile kernel serves the backward: the data gradient of a stride-1 conv is a stride-1
 * conv of dy (conv.c's bwd_data_direct), and the weight gradient swaps the operands' roles
 * (ql_conv_direct_bwd_weight, at the end of this file; pointwise convs too, since it reads
 * the image in its own NCHW layout).
 *
 * Chains of convs (an engine's FP32 plan, ql_conv2d_fwd_prepacked_layout): the input may come
 * already as that padded NHWC copy (a previous conv wrote it so), and the output may be
 * written as one, the tile's 16 channels of a pixel stored as they lie in the accumulators
 * (no transpose) and the border zeroed: the next conv then skips its copy. */
#include <immintrin.h>
#include <stdatomic.h>
#include <string.h>
#include "internal.h"

#define DR 6  /* most pixels per tile (broadcasts) */
#define DN 16 /* output channels per tile (two ymm) */
#define DKC 512 /* slab depth: sgemm.c's KC, so the sums are the same */

int ql_conv_direct_applies(int level, const ql_conv_geom *g) { return level == QL_ISA_AVX2 && g->groups == 1; }

size_t ql_conv_direct_packed_floats(const ql_conv_geom *g) {
    return (size_t)((g->K + DN - 1) / DN) * DN * (size_t)g->C * g->KH * g->KW;
}

/* wp[block][k][j] = w[block*16 + j][k] (zero for channels past K): the 16 weights a tap
 * multiplies, one load. */
void ql_conv_direct_pack(float *restrict wp, const float *restrict w, const ql_conv_geom *g) {
    int KK = g->C * g->KH * g->KW;
    for (int b0 = 0; b0 < g->K; b0 += DN) {
        float *dst = wp + (size_t)b0 * KK;
        for (int k = 0; k < KK; k++)
            for (int j = 0; j < DN; j++) dst[(size_t)k * DN + j] = b0 + j < g->K ? w[(size_t)(b0 + j) * KK + k] : 0.0f;
    }
}

/* acc[i][j] = sum over k < kc (fma from zero, increasing k) of px[i][off[k]] * w[k][j] for
 * i < R pixels; then tot = acc (mode 0), bias + acc (mode 1) or tot + acc (mode 2). R is a
 * constant in each caller (6, or 5 where the pixel count is a multiple of 5 but not of 6:
 * every map of the detector is), so the loops unroll and the pointers stay in registers.
 *
 * With skip, a border row's tile (see kernel_rows_inside): the sum takes only the taps k whose
 * place (k + phase) % S, in the period of S = KH * KW taps that each channel has, lies in
 * [ka, kb), the kernel rows its pixels read inside the image. */
__attribute__((target("avx2,fma"), always_inline)) static inline void tile_rows(int R, int kc, const float *const *px,
                                                                                const int *restrict off, const float *restrict w,
                                                                                float *restrict tot, const float *bias, int mode,
                                                                                int skip, int phase, int S, int ka, int kb) {
    __m256 c[DR][2];
    const float *pr[DR];
#pragma clang loop unroll(full)
    for (int i = 0; i < R; i++) c[i][0] = c[i][1] = _mm256_setzero_ps(), pr[i] = px[i];
#define DIRECT_STEP(wk, o)                                                   \
    do {                                                                     \
        __m256 b0 = _mm256_loadu_ps(wk), b1 = _mm256_loadu_ps((wk) + 8);     \
        _Pragma("clang loop unroll(full)") for (int i = 0; i < R; i++) {     \
            __m256 a = _mm256_broadcast_ss(pr[i] + (o));                     \
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);                       \
            c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);                       \
        }                                                                    \
    } while (0)
    if (!skip) {
        for (int k = 0; k < kc; k++, w += DN) DIRECT_STEP(w, off[k]);
    } else {
        /* period by period: the period that starts at slab index p reads [p + ka, p + kb) */
#define DIRECT_PERIOD(p)                                                             \
    do {                                                                             \
        int a_ = ql_max_i((p) + ka, 0), b_ = ql_min_i((p) + kb, kc);                 \
        for (int t = a_; t < b_; t++) DIRECT_STEP(w + (size_t)t * DN, off[t]);       \
    } while (0)
        int p = -phase;
        if (p < 0) { /* the slab starts within a period */
            DIRECT_PERIOD(p);
            p += S;
        }
        if (kb - ka == 6) /* two rows of a 3 x 3 kernel, unrolled */
            for (; p + kb <= kc; p += S) {
                const float *wp = w + (size_t)(p + ka) * DN;
                const int *op = off + p + ka;
                DIRECT_STEP(wp, op[0]);
                DIRECT_STEP(wp + DN, op[1]);
                DIRECT_STEP(wp + 2 * DN, op[2]);
                DIRECT_STEP(wp + 3 * DN, op[3]);
                DIRECT_STEP(wp + 4 * DN, op[4]);
                DIRECT_STEP(wp + 5 * DN, op[5]);
            }
        for (; p < kc; p += S) DIRECT_PERIOD(p);
#undef DIRECT_PERIOD
    }
#undef DIRECT_STEP
    __m256 s0 = mode == 1 ? _mm256_loadu_ps(bias) : _mm256_setzero_ps(), s1 = mode == 1 ? _mm256_loadu_ps(bias + 8) : s0;
#pragma clang loop unroll(full)
    for (int i = 0; i < R; i++) {
        float *t = tot + i * DN;
        if (mode == 0) {
            _mm256_store_ps(t, c[i][0]);
            _mm256_store_ps(t + 8, c[i][1]);
        } else if (mode == 1) {
            _mm256_store_ps(t, _mm256_add_ps(s0, c[i][0]));
            _mm256_store_ps(t + 8, _mm256_add_ps(s1, c[i][1]));
        } else {
            _mm256_store_ps(t, _mm256_add_ps(_mm256_load_ps(t), c[i][0]));
            _mm256_store_ps(t + 8, _mm256_add_ps(_mm256_load_ps(t + 8), c[i][1]));
        }
    }
}

__attribute__((target("avx2,fma"))) static void tile6(int kc, const float *const *px, const int *off, const float *w, float *tot,
                                                      const float *bias, int mode) {
    tile_rows(6, kc, px, off, w, tot, bias, mode, 0, 0, 0, 0, 0);
}

__attribute__((target("avx2,fma"))) static void tile5(int kc, const float *const *px, const int *off, const float *w, float *tot,
                                                      const float *bias, int mode) {
    tile_rows(5, kc, px, off, w, tot, bias, mode, 0, 0, 0, 0, 0);
}

typedef void (*border_tile_fn)(int kc, const float *const *px, const int *off, const float *w, float *tot, const float *bias,
                               int mode, int phase, int S, int ka, int kb);

__attribute__((target("avx2,fma"))) static void tile6_border(int kc, const float *const *px, const int *off, const float *w,
                                                             float *tot, const float *bias, int mode, int phase, int S, int ka, int kb) {
    tile_rows(6, kc, px, off, w, tot, bias, mode, 1, phase, S, ka, kb);
}

__attribute__((target("avx2,fma"))) static void tile5_border(int kc, const float *const *px, const int *off, const float *w,
                                                             float *tot, const float *bias, int mode, int phase, int S, int ka, int kb) {
    tile_rows(5, kc, px, off, w, tot, bias, mode, 1, phase, S, ka, kb);
}

typedef struct {
    const ql_conv_geom *g;
    const float *x, *wp, *b;
    float *y, *xp; /* xp: every image, padded, NHWC (batch mode, an NCHW input: the copy) */
    const int *off;
    int OH, OW, Hp, Wp, KK, tiles, tiles_per_group, blocks, act;
    int in_nhwc;               /* x is already padded NHWC (with the conv's own padding) */
    int out_nhwc, qh, qw;      /* y is written NHWC with a zero border of qh rows, qw columns */
    int R; /* pixels per tile: 6, or 5 */
    int accumulate; /* y += the conv instead of y = */
    int inner0, inner1; /* the output rows that read every kernel row inside the image */
    int span;           /* the most output rows a tile's pixels lie in */
    int pad_rows;       /* rows of the padded copy a pad task writes */
    _Atomic int status;
} direct_job;

/* r[i] (row i of an 8 x 8 block) becomes column i. */
__attribute__((target("avx2"))) static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Row hp of image n's padded NHWC copy, into row: zeros, or image row hp - PH transposed (8
 * channels x 8 pixels at a time) between PW pixels of zeros on either side. */
__attribute__((target("avx2"))) static void pad_row(const direct_job *j, int n, int hp, float *row) {
    const ql_conv_geom *g = j->g;
    int h = hp - g->PH, C = g->C, H = g->H, W = g->W;
    if (h < 0 || h >= H) {
        memset(row, 0, sizeof(float) * (size_t)j->Wp * C);
        return;
    }
    memset(row, 0, sizeof(float) * (size_t)g->PW * C);
    memset(row + (size_t)(g->PW + W) * C, 0, sizeof(float) * (size_t)(j->Wp - g->PW - W) * C);
    float *d = row + (size_t)g->PW * C;
    const float *src = j->x + ((size_t)n * C * H + h) * W; /* channel c's row: src + c * H * W */
    size_t plane = (size_t)H * W;
    int c = 0;
    for (; c + 8 <= C; c += 8) {
        int w = 0;
        for (; w + 8 <= W; w += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + (c + i) * plane + w);
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(d + (size_t)(w + i) * C + c, r[i]);
        }
        for (; w < W; w++)
            for (int i = 0; i < 8; i++) d[(size_t)w * C + c + i] = src[(c + i) * plane + w];
    }
    for (; c < C; c++)
        for (int w = 0; w < W; w++) d[(size_t)w * C + c] = src[c * plane + w];
}

/* Task t: rows [t * pad_rows, (t + 1) * pad_rows) of the batch's padded copy (row r: row
 * r % Hp of image r / Hp). Several rows a task: a row of a 3-channel input is a few hundred
 * floats, less work than claiming a task costs. */
static void pad_task(int t, void *p) {
    const direct_job *j = (const direct_job *)p;
    int rows = j->g->N * j->Hp, r1 = ql_min_i(rows, (t + 1) * j->pad_rows);
    for (int r = t * j->pad_rows; r < r1; r++) pad_row(j, r / j->Hp, r % j->Hp, j->xp + (size_t)r * j->Wp * j->g->C);
}

/* y[c * P + i] = tot[i][c] for i < rows, c < kn (through the activation act; added to y when accumulate):
 * the tile's pixels x 16 channels turned into 16 runs of adjacent pixels, 8 channels at a
 * time. A run of 6 or 5 is stored as 4 + 2 or 4 + 1 floats: AMD's masked stores (vmaskmovps)
 * are microcoded, and 16 of them a tile cost more than the tile's transposes and stores. */
__attribute__((target("avx2"))) static inline __m128 load_run(const float *y, int rows, __m128 *hi) {
    *hi = rows == 6 ? _mm_castpd_ps(_mm_load_sd((const double *)(y + 4))) : _mm_load_ss(y + 4);
    return _mm_loadu_ps(y);
}

__attribute__((target("avx2,fma"))) static void store_rows(float *y, int P, const float *tot, int rows, int kn, int act, int accumulate) {
    __m256 zero = _mm256_setzero_ps();
    if (rows < 5) { /* the batch's last tile: element by element */
        for (int c = 0; c < kn; c++)
            for (int i = 0; i < rows; i++) {
                float *o = y + (size_t)c * P + i, v = accumulate ? *o + tot[i * DN + c] : tot[i * DN + c];
                *o = ql_activate1(v, act);
            }
        return;
    }
    for (int c0 = 0; c0 < kn; c0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; i++) r[i] = i < rows ? _mm256_load_ps(tot + i * DN + c0) : zero;
        transpose8(r);
        for (int c = 0; c < 8 && c0 + c < kn; c++) {
            float *yc = y + (size_t)(c0 + c) * P;
            __m256 v = r[c];
            if (accumulate) {
                __m128 hi, lo = load_run(yc, rows, &hi);
                v = _mm256_add_ps(_mm256_set_m128(hi, lo), v);
            }
            v = ql_activate8(v, act);
            _mm_storeu_ps(yc, _mm256_castps256_ps128(v));
            __m128 h = _mm256_extractf128_ps(v, 1);
            if (rows == 6) _mm_store_sd((double *)(yc + 4), _mm_castps_pd(h));
            else _mm_store_ss(yc + 4, h);
        }
    }
}

/* NHWC output: pixel i's 16 channels are adjacent, so a tile's row is stored as it is. */
__attribute__((target("avx2,fma"))) static void store_pixels(float *const *yp, const float *tot, int rows, int kn, int act) {
    for (int i = 0; i < rows; i++) {
        const float *t = tot + i * DN;
        if (kn == DN) {
            _mm256_storeu_ps(yp[i], ql_activate8(_mm256_load_ps(t), act));
            _mm256_storeu_ps(yp[i] + 8, ql_activate8(_mm256_load_ps(t + 8), act));
        } else {
            for (int c = 0; c < kn; c++) yp[i][c] = ql_activate1(t[c], act);
        }
    }
}

/* The zero border of padded NHWC images [N][H + 2ph][W + 2pw][C] (the interior is left as it is). */
static void zero_border(float *y, int N, int C, int H, int W, int ph, int pw) {
    size_t row = (size_t)(W + 2 * pw) * C, side = (size_t)pw * C;
    for (int n = 0; n < N; n++) {
        float *img = y + (size_t)n * (H + 2 * ph) * row;
        memset(img, 0, sizeof(float) * row * ph);
        memset(img + (size_t)(ph + H) * row, 0, sizeof(float) * row * ph);
        if (side)
            for (int h = ph; h < ph + H; h++) {
                memset(img + h * row, 0, sizeof(float) * side);
                memset(img + h * row + row - side, 0, sizeof(float) * side);
            }
    }
}

/* Border rows. An output row at the top or bottom edge reads, at some kernel rows kh, only the
 * zero rows of the padding: those taps add 0 x w to each of its sums. For a finite weight that
 * is +0 or -0, and a sum that starts at +0 never becomes -0 under round to nearest (x + -x is
 * +0), so adding it changes no bit: a tile whose pixels all lie in such rows skips those taps
 * (the kernel's [ka, kb) range), and its sums are still the GEMM's. On a 10 x 10 map with 3 x 3
 * taps the top and bottom rows skip a third of their taps, 1/15 of the conv; on a 5 x 5 map
 * 2/15. (A weight of inf or NaN would make 0 x w NaN; a model's weights are finite.)
 * [*lo, *hi): the kernel rows that output row oh reads inside the image. */
static inline void kernel_rows_inside(const ql_conv_geom *g, int oh, int *lo, int *hi) {
    int ih = oh * g->SH - g->PH, a = 0, b = g->KH;
    while (a < b && ih + a * g->DH < 0) a++;
    while (b > a && ih + (b - 1) * g->DH >= g->H) b--;
    *lo = a, *hi = b;
}

static int reads_every_kernel_row(const ql_conv_geom *g, int oh) {
    int lo, hi;
    kernel_rows_inside(g, oh, &lo, &hi);
    return lo == 0 && hi == g->KH;
}

/* Tiles [t0, t1) of block `block` (16 output channels) over N images whose padded copies
 * start at xp and outputs at y. The tiles number the pixels of all N images (pixel q is image
 * q / P's pixel q % P), so a small map's last tile goes on into the next image instead of
 * running partly empty (a 5x5 map: 25 pixels in 5 tiles of 6). */
static void run_tiles(const direct_job *j, const float *xp, float *y, int N, long t0, long t1, int block) {
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, k0 = block * DN, kn = ql_min_i(DN, g->K - k0);
    long total = (long)N * P;
    size_t image = (size_t)j->Hp * j->Wp * g->C;
    int OWq = j->OW + 2 * j->qw;
    size_t out_image = j->out_nhwc ? (size_t)(j->OH + 2 * j->qh) * OWq * g->K : (size_t)g->K * P;
    const float *wb = j->wp + (size_t)k0 * j->KK;
    float bias[DN] = {0};
    if (j->b) for (int c = 0; c < kn; c++) bias[c] = j->b[k0 + c];
    float tot[DR * DN] __attribute__((aligned(32)));
    /* the first pixel as (image, row, column), then walked one pixel at a time */
    int R = j->R, S = g->KH * g->KW;
    void (*tile)(int, const float *const *, const int *, const float *, float *, const float *, int) = R == 5 ? tile5 : tile6;
    border_tile_fn tile_border = R == 5 ? tile5_border : tile6_border;
    long q0 = t0 * R;
    int n = (int)(q0 / P), pix = (int)(q0 % P), oh = pix / j->OW, ow = pix % j->OW;
    for (long t = t0; t < t1; t++, q0 += R) {
        int rows = (int)(total - q0 < R ? total - q0 : R);
        const float *px[DR];
        float *yp[DR];
        int oh0 = oh; /* the first pixel's row */
        for (int i = 0; i < rows; i++) {
            px[i] = xp + n * image + ((size_t)oh * g->SH * j->Wp + (size_t)ow * g->SW) * g->C;
            yp[i] = y + n * out_image + (j->out_nhwc ? ((size_t)(oh + j->qh) * OWq + ow + j->qw) * g->K + k0 : (size_t)k0 * P + pix);
            pix++;
            if (++ow == j->OW) {
                ow = 0;
                if (++oh == j->OH) { oh = 0; pix = 0; n++; }
            }
        }
        for (int i = rows; i < R; i++) px[i] = px[0], yp[i] = yp[0]; /* the last tile's empty rows: computed, not stored */
        /* A tile near the border rows (it touches at most j->span rows from oh0): the kernel rows
         * its pixels read inside the image, when they are all in one image. */
        int border = 0, kh0 = 0, kh1 = g->KH;
        if (oh0 < j->inner0 || oh0 + j->span > j->inner1) {
            long first = q0 % P, last = first + rows - 1;
            if (last < P) {
                kh0 = g->KH, kh1 = 0;
                for (long r = first / j->OW; r <= last / j->OW; r++) {
                    int lo, hi;
                    kernel_rows_inside(g, (int)r, &lo, &hi);
                    kh0 = ql_min_i(kh0, lo), kh1 = ql_max_i(kh1, hi);
                }
                border = kh0 > 0 || kh1 < g->KH;
            }
        }
        for (int pc = 0; pc < j->KK; pc += DKC) {
            int kc = ql_min_i(DKC, j->KK - pc), mode = pc ? 2 : (j->b ? 1 : 0);
            if (border) tile_border(kc, px, j->off + pc, wb + (size_t)pc * DN, tot, bias, mode, pc % S, S, kh0 * g->KW, kh1 * g->KW);
            else tile(kc, px, j->off + pc, wb + (size_t)pc * DN, tot, bias, mode);
        }
        if (j->out_nhwc) store_pixels(yp, tot, rows, kn, j->act);
        else if (yp[rows - 1] == yp[0] + rows - 1) store_rows(yp[0], P, tot, rows, kn, j->act, j->accumulate); /* one image's pixels */
        else
            for (int c = 0; c < kn; c++) {
                size_t o = (size_t)c * P;
                for (int i = 0; i < rows; i++) {
                    float v = j->accumulate ? yp[i][o] + tot[i * DN + c] : tot[i * DN + c];
                    yp[i][o] = ql_activate1(v, j->act);
                }
            }
    }
}

/* Batch mode, one unit: a run of tiles of the whole batch, one block. */
static void run_task(int t, void *p) {
    const direct_job *j = (const direct_job *)p;
    long t0 = (long)(t / j->blocks) * j->tiles_per_group;
    run_tiles(j, j->xp, j->y, j->g->N, t0, t0 + j->tiles_per_group < j->tiles ? t0 + j->tiles_per_group : j->tiles, t % j->blocks);
}

static _Thread_local ql_scratch tl_image;

/* Image mode, one unit: image n padded into the thread's own buffer (which stays in its
 * cache), then all of its tiles for every block. */
static void image_task(int n, void *p) {
    direct_job *j = (direct_job *)p;
    const ql_conv_geom *g = j->g;
    size_t image = (size_t)j->Hp * j->Wp * g->C;
    const float *xp = j->in_nhwc ? j->x + n * image : NULL;
    if (!j->in_nhwc) {
        float *own = (float *)ql_scratch_reserve(&tl_image, sizeof(float) * image);
        if (!own) {
            atomic_store(&j->status, QL_ENOMEM);
            return;
        }
        for (int hp = 0; hp < j->Hp; hp++) pad_row(j, n, hp, own + (size_t)hp * j->Wp * g->C);
        xp = own;
    }
    long tiles = ((long)j->OH * j->OW + j->R - 1) / j->R;
    float *y = j->y + (size_t)n * g->K * (j->OH + 2 * j->qh) * (j->OW + 2 * j->qw);
    if (j->out_nhwc) zero_border(y, 1, g->K, j->OH, j->OW, j->qh, j->qw);
    for (int block = 0; block < j->blocks; block++) run_tiles(j, xp, y, 1, 0, tiles, block);
}

/* The geometry both drivers share: output size, padded input size, taps, blocks of 16 output
 * channels. Returns QL_EINVAL for a bad geometry, 1 when there is nothing to compute, else 0. */
static int direct_geometry(const ql_conv_geom *g, int *OH, int *OW, int *Hp, int *Wp, int *KK, int *blocks) {
    if (ql_conv_out_size(g, OH, OW) || g->groups != 1) return QL_EINVAL;
    if (g->N == 0 || g->K == 0) return 1;
    *Hp = g->H + 2 * g->PH;
    *Wp = g->W + 2 * g->PW;
    *KK = g->C * g->KH * g->KW;
    *blocks = (g->K + DN - 1) / DN;
    return 0;
}

/* Rows of a tile for `count` rows in all: 5 where that leaves fewer empty rows than 6 (both are
 * FMA-bound alike: 10 sums a step in 5 cycles, or 12 in 6), e.g. a 5x5 map: 25 pixels. */
static int tile_rows_for(long count) { return (count + 4) / 5 * 5 < (count + 5) / 6 * 6 ? 5 : 6; }

static _Thread_local ql_scratch tl_xp, tl_off;

int ql_conv_direct_fwd(float *y, const float *x, const float *wp, const float *b, const ql_conv_geom *g, int act, int accumulate) {
    ql_layout nchw = {0, 0, 0};
    return ql_conv_direct_fwd_layout(y, nchw, x, nchw, wp, b, g, act, accumulate);
}

int ql_conv_direct_fwd_layout(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *wp, const float *b,
                              const ql_conv_geom *g, int act, int accumulate) {
    direct_job j = {g, x, wp, b, y, NULL, NULL, 0, 0, 0, 0, 0, 0, 0, 0, act, 0, 0, 0, 0, 6, accumulate, 0, 0, 0, 1, QL_OK};
    int geo = direct_geometry(g, &j.OH, &j.OW, &j.Hp, &j.Wp, &j.KK, &j.blocks);
    if (geo < 0) return geo;
    /* a padded NHWC input carries the conv's own padding; an NHWC output is stored, not added */
    if ((xlay.nhwc && (xlay.ph != g->PH || xlay.pw != g->PW)) || (ylay.nhwc && (accumulate || ylay.ph < 0 || ylay.pw < 0)))
        return QL_EINVAL;
    j.in_nhwc = xlay.nhwc != 0;
    j.out_nhwc = ylay.nhwc != 0;
    j.qh = j.out_nhwc ? ylay.ph : 0;
    j.qw = j.out_nhwc ? ylay.pw : 0;
    if (geo) return QL_OK; /* no images or no output channels */
    int *off = (int *)ql_scratch_reserve(&tl_off, sizeof(int) * (size_t)j.KK);
    if (!off) return QL_ENOMEM;
    /* k = (c, kh, kw), the weights' order: the GEMM's k */
    for (int c = 0, k = 0; c < g->C; c++)
        for (int kh = 0; kh < g->KH; kh++)
            for (int kw = 0; kw < g->KW; kw++) off[k++] = (kh * g->DH * j.Wp + kw * g->DW) * g->C + c;
    j.off = off;
    /* the output rows that read every kernel row inside the image: [inner0, inner1) */
    for (j.inner0 = 0; j.inner0 < j.OH && !reads_every_kernel_row(g, j.inner0); j.inner0++) {}
    for (j.inner1 = j.OH; j.inner1 > j.inner0 && !reads_every_kernel_row(g, j.inner1 - 1); j.inner1--) {}
    int threads = ql_get_num_threads(), P = j.OH * j.OW;
    /* Image mode where the images share out evenly between the threads and a map fills its
     * tiles (96 pixels or more: at most 5 of them wasted): each image is padded and convolved
     * by one thread while it sits in that thread's cache (a batch's padded copy would not fit:
     * 32 images of 80 x 80 x 16 are 14 MB). Batch mode otherwise: the whole batch padded,
     * then runs of tiles across images and blocks shared out. */
    int image_mode = P >= 96 && g->N >= threads && (g->N % threads == 0 || g->N >= 4 * threads);
    j.R = tile_rows_for(image_mode ? P : (long)g->N * P);
    j.span = 1 + (j.R - 1 + j.OW - 1) / j.OW;
    if (image_mode) {
        ql_parallel_for(g->N, image_task, &j);
        return atomic_load(&j.status);
    }
    if (j.in_nhwc) {
        j.xp = (float *)x; /* read only */
    } else {
        j.xp = (float *)ql_scratch_reserve(&tl_xp, sizeof(float) * (size_t)g->N * j.Hp * j.Wp * g->C);
        if (!j.xp) return QL_ENOMEM;
        int rows = g->N * j.Hp;
        j.pad_rows = ql_max_i(1, (rows + 4 * threads - 1) / (4 * threads)); /* 4 tasks a thread */
        ql_parallel_for((rows + j.pad_rows - 1) / j.pad_rows, pad_task, &j);
    }
    if (j.out_nhwc) zero_border(y, g->N, g->K, j.OH, j.OW, j.qh, j.qw);
    long tiles = ((long)g->N * P + j.R - 1) / j.R;
    if (tiles > 0x7fffffffL / 16) return QL_EINVAL;
    j.tiles = (int)tiles;
    /* runs of up to 16 tiles (the block's weights are read once per run), shorter where that
     * would give the threads too few units to share out evenly */
    j.tiles_per_group = ql_min_i(16, j.tiles);
    while (j.tiles_per_group > 1 && (long)j.blocks * ((j.tiles + j.tiles_per_group - 1) / j.tiles_per_group) < 8L * threads)
        j.tiles_per_group = (j.tiles_per_group + 1) / 2;
    /* runs of equal length: 20 tiles as 10 + 10, not 16 + 4 (a thread that claims a long run
     * last keeps the other one waiting) */
    int runs = (j.tiles + j.tiles_per_group - 1) / j.tiles_per_group;
    j.tiles_per_group = (j.tiles + runs - 1) / runs;
    ql_parallel_for(j.blocks * ((j.tiles + j.tiles_per_group - 1) / j.tiles_per_group), run_task, &j);
    return QL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Weight gradient                                                                           */
/* ---------------------------------------------------------------------------------------- */
/* dW[k][(c, kh, kw)] = sum over images and output pixels p of dy[k][p] * xp[c][p's tap (kh,
 * kw)]: the same tile kernel with the roles of the forward's operands taken by other arrays.
 * The 6 (or 5) broadcast rows are taps (c, kh, kw) of the zero-padded NCHW image, read at one
 * pixel-offset table for all of them (row base: plane c, tap offset); the vector operand is
 * dy transposed to [pixel][16 output channels]; the sum runs over the image's pixels, from
 * zero, and is added to the task's partial dW (images in order); the partials of the tasks
 * (consecutive images each) are then added to dW in task order. No im2col matrix, no packed
 * panels. */
typedef struct {
    const ql_conv_geom *g;
    const float *x, *dy;
    float *partials; /* per task [K][KK] */
    int OH, OW, Hp, Wp, KK, blocks, tasks, R;
    _Atomic int status;
} wgrad_job;

static _Thread_local ql_scratch tl_wg_x, tl_wg_dy, tl_wg_off, tl_wg_rows;

/* dst[p][j] = dy[k0 + j][p] for j < 16 (zero past K): one block of 16 channels of one image,
 * 8 channels x 8 pixels at a time. */
__attribute__((target("avx2"))) static void transpose_dy_block(float *dst, const float *dy, int K, int P, int k0) {
    for (int h = 0; h < DN; h += 8) {
        int kb = k0 + h, kn = ql_max_i(0, ql_min_i(8, K - kb));
        int p = 0;
        if (kn == 8)
            for (; p + 8 <= P; p += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(dy + (size_t)(kb + i) * P + p);
                transpose8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (size_t)(p + i) * DN + h, r[i]);
            }
        for (; p < P; p++)
            for (int i = 0; i < 8; i++) dst[(size_t)p * DN + h + i] = i < kn ? dy[(size_t)(kb + i) * P + p] : 0.0f;
    }
}

/* Images per kernel pass: their pixels run on in one sum (one offset table over all of them),
 * up to 2048 pixels deep, so that small maps (25 pixels) do not pay a tile's setup and store
 * per 25 steps. */
static int wgrad_images(int P) { return ql_max_i(1, 2048 / P); }

static void wgrad_task(int t, void *p) {
    wgrad_job *j = (wgrad_job *)p;
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, C = g->C, K = g->K;
    int n0 = (int)((long)t * g->N / j->tasks), n1 = (int)((long)(t + 1) * g->N / j->tasks);
    int m = ql_min_i(wgrad_images(P), n1 - n0);
    size_t plane = (size_t)j->Hp * j->Wp, image = plane * C;
    float *xp = (float *)ql_scratch_reserve(&tl_wg_x, sizeof(float) * image * m);
    float *dyt = (float *)ql_scratch_reserve(&tl_wg_dy, sizeof(float) * (size_t)j->blocks * DN * P * m);
    int *off = (int *)ql_scratch_reserve(&tl_wg_off, sizeof(int) * (size_t)P * m);
    const float **rowbase = (const float **)ql_scratch_reserve(&tl_wg_rows, sizeof(float *) * (size_t)j->KK);
    if (!xp || !dyt || !off || !rowbase) {
        atomic_store(&j->status, QL_ENOMEM);
        return;
    }
    /* pixel q of the pass: image q / P (its padded copy image floats on), pixel q % P */
    for (int i = 0, q = 0; i < m; i++)
        for (int oh = 0; oh < j->OH; oh++)
            for (int ow = 0; ow < j->OW; ow++) off[q++] = (int)(i * image) + oh * g->SH * j->Wp + ow * g->SW;
    for (int c = 0, k = 0; c < C; c++)
        for (int kh = 0; kh < g->KH; kh++)
            for (int kw = 0; kw < g->KW; kw++) rowbase[k++] = xp + c * plane + (size_t)kh * g->DH * j->Wp + (size_t)kw * g->DW;
    float *partial = j->partials + (size_t)t * K * j->KK;
    memset(partial, 0, sizeof(float) * (size_t)K * j->KK);
    void (*tile)(int, const float *const *, const int *, const float *, float *, const float *, int) = j->R == 5 ? tile5 : tile6;
    float tot[DR * DN] __attribute__((aligned(32)));
    for (int first = n0; first < n1; first += m) {
        int count = ql_min_i(m, n1 - first), depth = count * P;
        /* the images with their padding as zeros (NCHW), dy transposed: dyt[block][q][16] */
        for (int i = 0; i < count; i++)
            ql_pad_planes(xp + i * image, j->x + (size_t)(first + i) * C * g->H * g->W, C, g->H, g->W, g->PH, g->PW);
        for (int b = 0; b < j->blocks; b++)
            for (int i = 0; i < count; i++)
                transpose_dy_block(dyt + ((size_t)b * depth + (size_t)i * P) * DN, j->dy + (size_t)(first + i) * K * P, K, P, b * DN);
        for (int block = 0; block < j->blocks; block++) {
            int k0 = block * DN, kn = ql_min_i(DN, K - k0);
            const float *dyb = dyt + (size_t)block * depth * DN;
            for (int r0 = 0; r0 < j->KK; r0 += j->R) {
                int rows = ql_min_i(j->R, j->KK - r0);
                const float *px[DR];
                for (int i = 0; i < j->R; i++) px[i] = rowbase[r0 + (i < rows ? i : 0)];
                tile(depth, px, off, dyb, tot, NULL, 0);
                /* partial[k0 + c][r0 + i] += tot[i][c] */
                store_rows(partial + (size_t)k0 * j->KK + r0, j->KK, tot, rows, kn, 0, 1);
            }
        }
    }
}

int ql_conv_direct_bwd_weight(float *dw, const float *dy, const float *x, const ql_conv_geom *g) {
    wgrad_job j = {g, x, dy, NULL, 0, 0, 0, 0, 0, 0, 0, 6, QL_OK};
    int geo = direct_geometry(g, &j.OH, &j.OW, &j.Hp, &j.Wp, &j.KK, &j.blocks);
    if (geo) return geo < 0 ? geo : QL_OK;
    int threads = ql_get_num_threads();
    j.tasks = g->N >= threads && threads > 1 ? threads : 1;
    /* the pixel offsets of a pass are ints: images whose pass would not fit go to the GEMM */
    long pass = (long)ql_min_i(wgrad_images(j.OH * j.OW), g->N) * j.Hp * j.Wp * g->C;
    if (pass > 0x7fffffffL) return QL_EUNSUPPORTED;
    j.R = tile_rows_for(j.KK); /* the rows are taps here */
    j.partials = (float *)ql_aligned_alloc(sizeof(float) * (size_t)j.tasks * g->K * j.KK);
    if (!j.partials) return QL_ENOMEM;
    ql_parallel_for(j.tasks, wgrad_task, &j);
    int st = atomic_load(&j.status);
    if (st == QL_OK) {
        size_t n = (size_t)g->K * j.KK;
        for (int t = 0; t < j.tasks; t++) {
            const float *src = j.partials + (size_t)t * n;
            for (size_t i = 0; i < n; i++) dw[i] += src[i];
        }
    }
    ql_aligned_free(j.partials);
    return st;
}
