/* Direct FP32 convolution forward (AVX2): the conv's GEMM without packing the image.
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
 * and conv.c uses this path where it applies (AVX2, one group), for any batch. */
#include <immintrin.h>
#include <string.h>
#include "internal.h"

#define DR 6  /* pixels per tile (broadcasts) */
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

/* acc[i][j] = sum over k < kc (fma from zero, increasing k) of px[i][off[k]] * w[k][j];
 * then tot = acc (mode 0), bias + acc (mode 1) or tot + acc (mode 2). */
__attribute__((target("avx2,fma"))) static void tile_avx2(int kc, const float *const *px, const int *restrict off,
                                                          const float *restrict w, float *restrict tot,
                                                          const float *bias, int mode) {
    __m256 c[DR][2];
    for (int i = 0; i < DR; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    const float *p0 = px[0], *p1 = px[1], *p2 = px[2], *p3 = px[3], *p4 = px[4], *p5 = px[5];
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(w), b1 = _mm256_loadu_ps(w + 8);
        int o = off[k];
        __m256 a;
        a = _mm256_broadcast_ss(p0 + o); c[0][0] = _mm256_fmadd_ps(a, b0, c[0][0]); c[0][1] = _mm256_fmadd_ps(a, b1, c[0][1]);
        a = _mm256_broadcast_ss(p1 + o); c[1][0] = _mm256_fmadd_ps(a, b0, c[1][0]); c[1][1] = _mm256_fmadd_ps(a, b1, c[1][1]);
        a = _mm256_broadcast_ss(p2 + o); c[2][0] = _mm256_fmadd_ps(a, b0, c[2][0]); c[2][1] = _mm256_fmadd_ps(a, b1, c[2][1]);
        a = _mm256_broadcast_ss(p3 + o); c[3][0] = _mm256_fmadd_ps(a, b0, c[3][0]); c[3][1] = _mm256_fmadd_ps(a, b1, c[3][1]);
        a = _mm256_broadcast_ss(p4 + o); c[4][0] = _mm256_fmadd_ps(a, b0, c[4][0]); c[4][1] = _mm256_fmadd_ps(a, b1, c[4][1]);
        a = _mm256_broadcast_ss(p5 + o); c[5][0] = _mm256_fmadd_ps(a, b0, c[5][0]); c[5][1] = _mm256_fmadd_ps(a, b1, c[5][1]);
        w += DN;
    }
    __m256 s0 = mode == 1 ? _mm256_loadu_ps(bias) : _mm256_setzero_ps(), s1 = mode == 1 ? _mm256_loadu_ps(bias + 8) : s0;
    for (int i = 0; i < DR; i++) {
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

typedef struct {
    const ql_conv_geom *g;
    const float *x, *wp, *b;
    float *y, *xp; /* xp: every image, padded, NHWC */
    const int *off;
    int OH, OW, Hp, Wp, KK, tiles, tiles_per_group, blocks, act;
} direct_job;

/* Image n, NCHW -> xp: (H + 2PH) x (W + 2PW) pixels of C channels, zeros around. */
static void pad_nhwc_task(int n, void *p) {
    const direct_job *j = (const direct_job *)p;
    const ql_conv_geom *g = j->g;
    int C = g->C, H = g->H, W = g->W;
    float *dst = j->xp + (size_t)n * j->Hp * j->Wp * C;
    const float *src = j->x + (size_t)n * C * H * W;
    memset(dst, 0, sizeof(float) * (size_t)g->PH * j->Wp * C);
    for (int h = 0; h < H; h++) {
        float *row = dst + (size_t)(h + g->PH) * j->Wp * C;
        memset(row, 0, sizeof(float) * (size_t)g->PW * C);
        memset(row + (size_t)(g->PW + W) * C, 0, sizeof(float) * (size_t)(j->Wp - g->PW - W) * C);
        float *d = row + (size_t)g->PW * C;
        for (int c = 0; c < C; c++) {
            const float *s = src + ((size_t)c * H + h) * W;
            for (int w = 0; w < W; w++) d[(size_t)w * C + c] = s[w];
        }
    }
    size_t below = (size_t)(j->Hp - g->PH - H) * j->Wp * C;
    memset(dst + (size_t)(g->PH + H) * j->Wp * C, 0, sizeof(float) * below);
}

/* One unit: a run of tiles, one block of 16 output channels. The tiles number the pixels of
 * the whole batch (pixel q is image q / P's pixel q % P), so a small map's last tile goes on
 * into the next image instead of running partly empty (a 5x5 map: 25 pixels in 5 tiles of 6). */
static void direct_task(int t, void *p) {
    const direct_job *j = (const direct_job *)p;
    const ql_conv_geom *g = j->g;
    int block = t % j->blocks, run = t / j->blocks;
    int P = j->OH * j->OW, k0 = block * DN, kn = ql_min_i(DN, g->K - k0);
    long total = (long)g->N * P;
    size_t image = (size_t)j->Hp * j->Wp * g->C;
    const float *wb = j->wp + (size_t)k0 * j->KK;
    float bias[DN] = {0};
    if (j->b) for (int c = 0; c < kn; c++) bias[c] = j->b[k0 + c];
    float tot[DR * DN] __attribute__((aligned(32)));
    long t0 = (long)run * j->tiles_per_group, t1 = t0 + j->tiles_per_group < j->tiles ? t0 + j->tiles_per_group : j->tiles;
    for (long tile = t0; tile < t1; tile++) {
        long q0 = tile * DR;
        int rows = (int)(total - q0 < DR ? total - q0 : DR);
        const float *px[DR];
        float *yp[DR];
        for (int i = 0; i < DR; i++) {
            long q = q0 + (i < rows ? i : 0);
            int n = (int)(q / P), pix = (int)(q % P), oh = pix / j->OW, ow = pix % j->OW;
            px[i] = j->xp + n * image + ((size_t)oh * g->SH * j->Wp + (size_t)ow * g->SW) * g->C;
            yp[i] = j->y + ((size_t)n * g->K + k0) * P + pix;
        }
        for (int pc = 0; pc < j->KK; pc += DKC) {
            int kc = ql_min_i(DKC, j->KK - pc);
            tile_avx2(kc, px, j->off + pc, wb + (size_t)pc * DN, tot, bias, pc ? 2 : (j->b ? 1 : 0));
        }
        for (int c = 0; c < kn; c++) {
            size_t o = (size_t)c * P;
            if (j->act) for (int i = 0; i < rows; i++) { float v = tot[i * DN + c]; yp[i][o] = v > 0.0f ? v : 0.0f; }
            else for (int i = 0; i < rows; i++) yp[i][o] = tot[i * DN + c];
        }
    }
}

static _Thread_local ql_scratch tl_xp, tl_off;

int ql_conv_direct_fwd(float *y, const float *x, const float *wp, const float *b, const ql_conv_geom *g, int act) {
    direct_job j = {g, x, wp, b, y, NULL, NULL, 0, 0, 0, 0, 0, 0, 0, 0, act};
    if (ql_conv_out_size(g, &j.OH, &j.OW) || g->groups != 1) return QL_EINVAL;
    if (g->N == 0 || g->K == 0) return QL_OK;
    j.Hp = g->H + 2 * g->PH;
    j.Wp = g->W + 2 * g->PW;
    j.KK = g->C * g->KH * g->KW;
    int *off = (int *)ql_scratch_reserve(&tl_off, sizeof(int) * (size_t)j.KK);
    j.xp = (float *)ql_scratch_reserve(&tl_xp, sizeof(float) * (size_t)g->N * j.Hp * j.Wp * g->C);
    if (!off || !j.xp) return QL_ENOMEM;
    /* k = (c, kh, kw), the weights' order: the GEMM's k */
    for (int c = 0, k = 0; c < g->C; c++)
        for (int kh = 0; kh < g->KH; kh++)
            for (int kw = 0; kw < g->KW; kw++) off[k++] = (kh * g->DH * j.Wp + kw * g->DW) * g->C + c;
    j.off = off;
    ql_parallel_for(g->N, pad_nhwc_task, &j);
    int threads = ql_get_num_threads();
    long tiles = ((long)g->N * j.OH * j.OW + DR - 1) / DR;
    if (tiles > 0x7fffffffL / 16) return QL_EINVAL;
    j.tiles = (int)tiles;
    j.blocks = (g->K + DN - 1) / DN;
    /* runs of up to 16 tiles (the block's weights are read once per run), shorter where that
     * would give the threads too few units to share out evenly */
    j.tiles_per_group = ql_min_i(16, j.tiles);
    while (j.tiles_per_group > 1 && (long)j.blocks * ((j.tiles + j.tiles_per_group - 1) / j.tiles_per_group) < 8L * threads)
        j.tiles_per_group = (j.tiles_per_group + 1) / 2;
    ql_parallel_for(j.blocks * ((j.tiles + j.tiles_per_group - 1) / j.tiles_per_group), direct_task, &j);
    return QL_OK;
}
