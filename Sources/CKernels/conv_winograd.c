/* Winograd F(2x2, 3x3) convolution for the FP32 engine (contract in ckernels.h,
 * ql_winograd_f23_*).
 *
 * A 3x3 stride-1 conv computes each 2x2 block of output pixels from a 4x4 block of input
 * (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):
 *
 *   Y = A^T [ sum_c (G g G^T) (.) (B^T d B) ] A       (.) elementwise, per (output k, tile)
 *
 *   G = | 1    0    0  |   B^T = | 1  0 -1  0 |   A^T = | 1  1  1  0 |
 *       | 1/2  1/2  1/2|         | 0  1  1  0 |         | 0  1 -1 -1 |
 *       | 1/2 -1/2  1/2|         | 0 -1  1  0 |
 *       | 0    0    1  |         | 0  1  0 -1 |
 *
 * g is a 3x3 filter, d a 4x4 input tile (overlapping its neighbours by 2), Y the 2x2 output.
 * The sum over channels is, for each of the 16 positions of the 4x4 transformed tile, one
 * GEMM [tiles x C] x [C x K]: 16 multiplies per 4 outputs per (c, k) where the direct conv
 * takes 36, so 2.25x fewer. The transforms are additions (and the weights' halvings, done
 * once at packing). What it costs: the sums run in another order and through the transforms,
 * so the result is not the direct conv's bits; F(2, 3)'s error is a few units in the last
 * place of the tile's magnitudes (tested against ql_conv2d_fwd_ref with a bound from |x|*|w|).
 * So the engine uses it only where bits are not promised (the FP32 baseline plan; never where
 * an INT8 plan must equal the simulator) and only where it times faster than the direct conv.
 *
 * Layout: the input is NHWC with the conv's padding as a zero border (the layout the direct
 * kernel chains; an NCHW input is copied into it first); each task takes a block of tiles,
 * transforms them into V[16][tiles][C] (channels contiguous: 8 lanes of AVX2 at a time), runs
 * the 16 GEMMs M_p [K x tiles] = U_p [K x C] x V_p^T on the calling thread, U_p packed once as
 * the SGEMM's A panels (ql_sgemm_packed_a_serial; only the block's V_p is packed per call),
 * and transforms M into the output pixels with the bias and the activation (8 tiles at a
 * time, each lane stored to its own pixel). Blocks are sized so that V and M stay in L2. */
#include <immintrin.h>
#include <stdatomic.h>
#include <string.h>
#include "internal.h"

#ifndef QL_WINO_BUDGET
#define QL_WINO_BUDGET 4096
#endif

int ql_winograd_f23_applies(const ql_conv_geom *g) {
    return g && g->KH == 3 && g->KW == 3 && g->SH == 1 && g->SW == 1 && g->DH == 1 && g->DW == 1 && g->groups == 1 &&
           g->C > 0 && g->K > 0;
}

/* Floats of one position's weight matrix U_p [K x C]: the SGEMM's packed A panels for isa,
 * or (ref) the plain matrix. */
static size_t position_floats(int level, int K, int C) {
    return level == QL_ISA_REF ? (size_t)K * C : ql_sgemm_packed_a_floats((ql_isa)level, K, C);
}

size_t ql_winograd_f23_packed_floats(ql_isa isa, const ql_conv_geom *g) {
    int level = ql_resolve_isa(isa);
    return level >= 0 && ql_winograd_f23_applies(g) ? 16 * position_floats(level, g->K, g->C) : 0;
}

int ql_winograd_f23_pack(ql_isa isa, float *W, const float *w, const ql_conv_geom *g) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    if (!W || !w || !ql_winograd_f23_applies(g)) return QL_EINVAL;
    const int C = g->C, K = g->K;
    float *U = (float *)ql_aligned_alloc(sizeof(float) * 16 * (size_t)K * C); /* U[p][k][c] */
    if (!U) return QL_ENOMEM;
    for (int k = 0; k < K; k++)
        for (int c = 0; c < C; c++) {
            const float *f = w + ((size_t)k * C + c) * 9;
            float t[4][3], u[4][4];
            for (int j = 0; j < 3; j++) { /* G f */
                t[0][j] = f[j];
                t[1][j] = 0.5f * (f[j] + f[3 + j] + f[6 + j]);
                t[2][j] = 0.5f * (f[j] - f[3 + j] + f[6 + j]);
                t[3][j] = f[6 + j];
            }
            for (int i = 0; i < 4; i++) { /* (G f) G^T */
                u[i][0] = t[i][0];
                u[i][1] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
                u[i][2] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
                u[i][3] = t[i][2];
            }
            for (int p = 0; p < 16; p++) U[((size_t)p * K + k) * C + c] = u[p / 4][p % 4];
        }
    size_t per = position_floats(level, K, C);
    int status = QL_OK;
    for (int p = 0; p < 16 && status == QL_OK; p++) {
        const float *Up = U + (size_t)p * K * C;
        if (level == QL_ISA_REF) memcpy(W + p * per, Up, sizeof(float) * per);
        else status = ql_sgemm_pack_a((ql_isa)level, 0, K, C, 1.0f, Up, C, W + p * per);
    }
    ql_aligned_free(U);
    return status;
}

typedef struct {
    const ql_conv_geom *g;
    int isa, act, OH, OW, tH, tW, T, tb, Hp, Wp, qh, qw;
    const float *x; /* NHWC, padded by the conv's PH, PW: [N][Hp][Wp][C] */
    const float *W, *b;
    float *y; /* NHWC with a border (qh, qw): [N][OH + 2qh][OW + 2qw][K] */
    _Atomic int status;
} wino_job;

static _Thread_local ql_scratch tl_v, tl_m, tl_zero, tl_dst;

/* V = B^T d B for channels [c0, c1) of one tile; src[p]: the tile's pixel p = 4i + j (a row of
 * C floats, or zeros outside the padded image); out: V for position 0 of this tile, the
 * positions `pstride` floats apart. Additions only: the AVX2 version gives the same bits. */
static void input_tile_ref(const float *const *src, int c0, int c1, float *out, size_t pstride) {
    for (int c = c0; c < c1; c++) {
        float d[4][4], t[4][4];
        for (int p = 0; p < 16; p++) d[p / 4][p % 4] = src[p][c];
        for (int j = 0; j < 4; j++) {
            t[0][j] = d[0][j] - d[2][j];
            t[1][j] = d[1][j] + d[2][j];
            t[2][j] = d[2][j] - d[1][j];
            t[3][j] = d[1][j] - d[3][j];
        }
        for (int i = 0; i < 4; i++) {
            out[(size_t)(4 * i + 0) * pstride + c] = t[i][0] - t[i][2];
            out[(size_t)(4 * i + 1) * pstride + c] = t[i][1] + t[i][2];
            out[(size_t)(4 * i + 2) * pstride + c] = t[i][2] - t[i][1];
            out[(size_t)(4 * i + 3) * pstride + c] = t[i][1] - t[i][3];
        }
    }
}

__attribute__((target("avx2,fma"))) static int input_tile_avx2(const float *const *src, int C, float *out, size_t pstride) {
    int c = 0;
    for (; c + 8 <= C; c += 8) {
        __m256 d[16], t[16];
        for (int p = 0; p < 16; p++) d[p] = _mm256_loadu_ps(src[p] + c);
        for (int j = 0; j < 4; j++) {
            t[0 + j] = _mm256_sub_ps(d[0 + j], d[8 + j]);
            t[4 + j] = _mm256_add_ps(d[4 + j], d[8 + j]);
            t[8 + j] = _mm256_sub_ps(d[8 + j], d[4 + j]);
            t[12 + j] = _mm256_sub_ps(d[4 + j], d[12 + j]);
        }
        for (int i = 0; i < 4; i++) {
            const __m256 *r = t + 4 * i;
            _mm256_storeu_ps(out + (size_t)(4 * i + 0) * pstride + c, _mm256_sub_ps(r[0], r[2]));
            _mm256_storeu_ps(out + (size_t)(4 * i + 1) * pstride + c, _mm256_add_ps(r[1], r[2]));
            _mm256_storeu_ps(out + (size_t)(4 * i + 2) * pstride + c, _mm256_sub_ps(r[2], r[1]));
            _mm256_storeu_ps(out + (size_t)(4 * i + 3) * pstride + c, _mm256_sub_ps(r[1], r[3]));
        }
    }
    return c;
}

/* Y = A^T m A (+ bias, activation) for tiles [i0, i1) of a block and one output channel k: m
 * holds position p's sums for channel k at m[p * pstride + i] (tile i); dst[i][a][b] is tile
 * i's output pixel (2th + a, 2tw + b) at channel 0, or NULL where it lies outside the map. */
static void output_tiles_ref(const float *m, size_t pstride, float bias, int act, int k, int i0, int i1, float *const (*dst)[2][2]) {
    for (int i = i0; i < i1; i++) {
        float v[16], s0[4], s1[4];
        for (int p = 0; p < 16; p++) v[p] = m[(size_t)p * pstride + i];
        for (int j = 0; j < 4; j++) {
            s0[j] = v[j] + v[4 + j] + v[8 + j];
            s1[j] = v[4 + j] - v[8 + j] - v[12 + j];
        }
        float y[2][2] = {{s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]}, {s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]}};
        for (int a = 0; a < 2; a++)
            for (int c = 0; c < 2; c++)
                if (dst[i][a][c]) dst[i][a][c][k] = ql_activate1(y[a][c] + bias, act);
    }
}

/* The same, 8 tiles at a time (lanes: tiles); returns the tiles done. Each lane's value is
 * computed as in output_tiles_ref (the same additions, and the activation's 8-lane twin, bit
 * for bit its scalar function), then stored to its own pixel. */
__attribute__((target("avx2,fma"))) static int output_tiles_avx2(const float *m, size_t pstride, float bias, int act, int k, int nt,
                                                                  float *const (*dst)[2][2]) {
    int i = 0;
    const __m256 b = _mm256_set1_ps(bias);
    for (; i + 8 <= nt; i += 8) {
        __m256 v[16], s0[4], s1[4];
        for (int p = 0; p < 16; p++) v[p] = _mm256_loadu_ps(m + (size_t)p * pstride + i);
        for (int j = 0; j < 4; j++) {
            s0[j] = _mm256_add_ps(_mm256_add_ps(v[j], v[4 + j]), v[8 + j]);
            s1[j] = _mm256_sub_ps(_mm256_sub_ps(v[4 + j], v[8 + j]), v[12 + j]);
        }
        __m256 y[2][2] = {{_mm256_add_ps(_mm256_add_ps(s0[0], s0[1]), s0[2]), _mm256_sub_ps(_mm256_sub_ps(s0[1], s0[2]), s0[3])},
                          {_mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), s1[2]), _mm256_sub_ps(_mm256_sub_ps(s1[1], s1[2]), s1[3])}};
        for (int a = 0; a < 2; a++)
            for (int c = 0; c < 2; c++) {
                float lanes[8];
                _mm256_storeu_ps(lanes, ql_activate8(_mm256_add_ps(y[a][c], b), act));
                for (int l = 0; l < 8; l++)
                    if (dst[i + l][a][c]) dst[i + l][a][c][k] = lanes[l];
            }
    }
    return i;
}

static void wino_task(int t, void *p) {
    wino_job *j = (wino_job *)p;
    const ql_conv_geom *g = j->g;
    const int C = g->C, K = g->K, t0 = t * j->tb, nt = ql_min_i(j->tb, j->T - t0);
    if (nt <= 0) return;
    float *V = (float *)ql_scratch_reserve(&tl_v, sizeof(float) * 16 * (size_t)j->tb * C);
    float *M = (float *)ql_scratch_reserve(&tl_m, sizeof(float) * 16 * (size_t)j->tb * K);
    float *zero = (float *)ql_scratch_reserve(&tl_zero, sizeof(float) * (size_t)C);
    if (!V || !M || !zero) {
        atomic_store(&j->status, QL_ENOMEM);
        return;
    }
    memset(zero, 0, sizeof(float) * (size_t)C);
    const int simd = j->isa >= QL_ISA_AVX2;
    for (int i = 0; i < nt; i++) {
        int tile = t0 + i, n = tile / (j->tH * j->tW), th = (tile / j->tW) % j->tH, tw = tile % j->tW;
        const float *src[16];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) {
                int hp = 2 * th + r, wp = 2 * tw + c; /* padded coordinates */
                src[4 * r + c] = hp < j->Hp && wp < j->Wp ? j->x + (((size_t)n * j->Hp + hp) * j->Wp + wp) * C : zero;
            }
        float *out = V + (size_t)i * C;
        int done = simd ? input_tile_avx2(src, C, out, (size_t)j->tb * C) : 0;
        input_tile_ref(src, done, C, out, (size_t)j->tb * C);
    }
    /* M_p [K x nt] = U_p [K x C] x V_p^T [C x nt] (V_p is [nt][C]: the transposed B operand) */
    size_t per = position_floats(j->isa, K, C);
    for (int q = 0; q < 16; q++) {
        const float *Vq = V + (size_t)q * j->tb * C;
        float *Mq = M + (size_t)q * K * j->tb;
        int st = j->isa == QL_ISA_REF ? ql_sgemm_ref(0, 1, K, nt, C, 1.0f, j->W + q * per, C, Vq, C, 0.0f, Mq, j->tb)
                                      : ql_sgemm_packed_a_serial((ql_isa)j->isa, K, nt, C, j->W + q * per, 1, Vq, C, 0.0f, Mq, j->tb);
        if (st) {
            atomic_store(&j->status, st);
            return;
        }
    }
    const int OHp = j->OH + 2 * j->qh, OWp = j->OW + 2 * j->qw;
    float *(*dst)[2][2] = (float *(*)[2][2])ql_scratch_reserve(&tl_dst, sizeof(float *[2][2]) * (size_t)nt);
    if (!dst) {
        atomic_store(&j->status, QL_ENOMEM);
        return;
    }
    for (int i = 0; i < nt; i++) {
        int tile = t0 + i, n = tile / (j->tH * j->tW), th = (tile / j->tW) % j->tH, tw = tile % j->tW;
        for (int a = 0; a < 2; a++)
            for (int c = 0; c < 2; c++) {
                int oh = 2 * th + a, ow = 2 * tw + c;
                dst[i][a][c] = oh < j->OH && ow < j->OW ? j->y + (((size_t)n * OHp + oh + j->qh) * OWp + ow + j->qw) * K : NULL;
            }
    }
    for (int k = 0; k < K; k++) {
        const float *m = M + (size_t)k * j->tb;
        float bias = j->b ? j->b[k] : 0.0f;
        int done = simd ? output_tiles_avx2(m, (size_t)K * j->tb, bias, j->act, k, nt, (float *const (*)[2][2])dst) : 0;
        output_tiles_ref(m, (size_t)K * j->tb, bias, j->act, k, done, nt, (float *const (*)[2][2])dst);
    }
}

/* The zero border of an NHWC output [N][OH + 2qh][OW + 2qw][K]. */
static void zero_border(float *y, int N, int OH, int OW, int K, int qh, int qw) {
    if (!qh && !qw) return;
    size_t row = (size_t)(OW + 2 * qw) * K;
    for (int n = 0; n < N; n++) {
        float *img = y + (size_t)n * (OH + 2 * qh) * row;
        memset(img, 0, sizeof(float) * row * qh);
        memset(img + (size_t)(OH + qh) * row, 0, sizeof(float) * row * qh);
        for (int h = qh; h < OH + qh; h++) {
            memset(img + h * row, 0, sizeof(float) * (size_t)qw * K);
            memset(img + h * row + (size_t)(OW + qw) * K, 0, sizeof(float) * (size_t)qw * K);
        }
    }
}

int ql_winograd_f23_fwd_layout(ql_isa isa, float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *W,
                               const float *b, const ql_conv_geom *g, int act) {
    int OH, OW;
    if (!y || !x || !W || !ql_winograd_f23_applies(g) || ql_conv_out_size(g, &OH, &OW) != QL_OK || act < 0 || act > 2 ||
        (xlay.nhwc && (xlay.ph != g->PH || xlay.pw != g->PW)) || (ylay.nhwc && (ylay.ph < 0 || ylay.pw < 0)))
        return QL_EINVAL;
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    const int N = g->N, C = g->C, K = g->K, Hp = g->H + 2 * g->PH, Wp = g->W + 2 * g->PW;
    if (N == 0 || OH == 0 || OW == 0) return QL_OK;
    float *xp = NULL, *yn = NULL;
    if (!xlay.nhwc) { /* NCHW: the padded NHWC copy the direct kernel makes too */
        xp = (float *)ql_aligned_alloc(sizeof(float) * (size_t)N * Hp * Wp * C);
        if (!xp) return QL_ENOMEM;
        ql_nchw_to_nhwc(xp, x, N, C, g->H, g->W, g->PH, g->PW);
    }
    if (!ylay.nhwc && !(yn = (float *)ql_aligned_alloc(sizeof(float) * (size_t)N * OH * OW * K))) {
        ql_aligned_free(xp);
        return QL_ENOMEM;
    }
    wino_job j = {g, level, act, OH, OW, (OH + 1) / 2, (OW + 1) / 2, 0, 0, Hp, Wp, ylay.nhwc ? ylay.ph : 0, ylay.nhwc ? ylay.pw : 0,
                  xp ? xp : x, W, b, yn ? yn : y, QL_OK};
    j.T = N * j.tH * j.tW;
    /* a block's V and M within ~512 KiB (L2); at least 16 tiles (the GEMM's panel width on
     * AVX2: its N is the tiles), and a block for each thread where there are tiles enough */
    int tb = ql_max_i(16, ql_min_i(256, QL_WINO_BUDGET / (C + K))) / 16 * 16;
    int threads = ql_get_num_threads(), per = (j.T + threads - 1) / threads;
    j.tb = ql_min_i(tb, ql_max_i(16, (per + 15) / 16 * 16));
    ql_parallel_for((j.T + j.tb - 1) / j.tb, wino_task, &j);
    int status = atomic_load(&j.status);
    if (status == QL_OK) {
        if (yn) ql_nhwc_to_nchw(y, yn, N, K, OH, OW, 0, 0);
        else zero_border(y, N, OH, OW, K, j.qh, j.qw);
    }
    ql_aligned_free(xp);
    ql_aligned_free(yn);
    return status;
}
