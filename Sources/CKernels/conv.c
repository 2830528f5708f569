/* im2col / col2im and the convolution drivers (contracts in ckernels.h). */
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

int ql_conv_out_size(const ql_conv_geom *g, int *OH, int *OW) {
    if (!g || g->N < 0 || g->C <= 0 || g->H <= 0 || g->W <= 0 || g->K <= 0 || g->KH <= 0 ||
        g->KW <= 0 || g->SH <= 0 || g->SW <= 0 || g->PH < 0 || g->PW < 0 || g->DH <= 0 ||
        g->DW <= 0 || g->groups <= 0 || g->C % g->groups || g->K % g->groups)
        return QL_EINVAL;
    int eh = g->H + 2 * g->PH - g->DH * (g->KH - 1) - 1;
    int ew = g->W + 2 * g->PW - g->DW * (g->KW - 1) - 1;
    if (eh < 0 || ew < 0) return QL_EINVAL;
    *OH = eh / g->SH + 1;
    *OW = ew / g->SW + 1;
    return QL_OK;
}

static inline int out_dim(int H, int K, int S, int P, int D) { return (H + 2 * P - D * (K - 1) - 1) / S + 1; }

void ql_im2col(float *restrict col, const float *restrict x, int C, int H, int W, int KH, int KW,
               int SH, int SW, int PH, int PW, int DH, int DW) {
    int OH = out_dim(H, KH, SH, PH, DH), OW = out_dim(W, KW, SW, PW, DW);
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                float *dst = col + ((size_t)(c * KH + kh) * KW + kw) * OH * OW;
                const float *src = x + (size_t)c * H * W;
                /* valid output columns for this tap: 0 <= ow*SW - PW + kw*DW < W */
                int off = kw * DW - PW;
                int ow_lo = off >= 0 ? 0 : (-off + SW - 1) / SW;
                int ow_hi = W - off <= 0 ? 0 : (W - off - 1) / SW + 1; /* exclusive */
                if (ow_hi > OW) ow_hi = OW;
                if (ow_lo > ow_hi) ow_lo = ow_hi;
                for (int oh = 0; oh < OH; oh++) {
                    int ih = oh * SH - PH + kh * DH;
                    float *d = dst + (size_t)oh * OW;
                    if (ih < 0 || ih >= H) {
                        memset(d, 0, sizeof(float) * (size_t)OW);
                        continue;
                    }
                    const float *s = src + (size_t)ih * W + off;
                    for (int ow = 0; ow < ow_lo; ow++) d[ow] = 0.0f;
                    if (SW == 1) memcpy(d + ow_lo, s + ow_lo, sizeof(float) * (size_t)(ow_hi - ow_lo));
                    else for (int ow = ow_lo; ow < ow_hi; ow++) d[ow] = s[ow * SW];
                    for (int ow = ow_hi; ow < OW; ow++) d[ow] = 0.0f;
                }
            }
}

/* col2im with col's rows ldcol floats apart (an image's share of a wider matrix) */
static void col2im_ld(float *restrict x, const float *restrict col, size_t ldcol, int C, int H, int W, int KH, int KW,
                      int SH, int SW, int PH, int PW, int DH, int DW) {
    int OH = out_dim(H, KH, SH, PH, DH), OW = out_dim(W, KW, SW, PW, DW);
    for (int c = 0; c < C; c++)
        for (int kh = 0; kh < KH; kh++)
            for (int kw = 0; kw < KW; kw++) {
                const float *src = col + ((size_t)(c * KH + kh) * KW + kw) * ldcol;
                float *dst = x + (size_t)c * H * W;
                int off = kw * DW - PW;
                int ow_lo = off >= 0 ? 0 : (-off + SW - 1) / SW;
                int ow_hi = W - off <= 0 ? 0 : (W - off - 1) / SW + 1;
                if (ow_hi > OW) ow_hi = OW;
                if (ow_lo > ow_hi) ow_lo = ow_hi;
                for (int oh = 0; oh < OH; oh++) {
                    int ih = oh * SH - PH + kh * DH;
                    if (ih < 0 || ih >= H) continue;
                    const float *s = src + (size_t)oh * OW;
                    float *d = dst + (size_t)ih * W + off;
                    for (int ow = ow_lo; ow < ow_hi; ow++) d[ow * SW] += s[ow];
                }
            }
}

void ql_col2im(float *restrict x, const float *restrict col, int C, int H, int W, int KH, int KW,
               int SH, int SW, int PH, int PW, int DH, int DW) {
    int OH = out_dim(H, KH, SH, PH, DH), OW = out_dim(W, KW, SW, PW, DW);
    col2im_ld(x, col, (size_t)OH * OW, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW);
}

/* ---------------------------------------------------------------------------------------- */
/* References: direct loops over the definition. One loop nest visits every (output, tap)    */
/* pair whose input pixel lies inside the image; the three passes differ only in what they  */
/* do with the pair.                                                                         */
/* ---------------------------------------------------------------------------------------- */
typedef enum { REF_FWD, REF_BWD_DATA, REF_BWD_WEIGHT } ref_pass;

static int conv_ref(ref_pass pass, const ql_conv_geom *g, float *y_or_dx_or_dw, float *db,
                    const float *x_or_dy, const float *w_or_x, const float *b_or_dy) {
    int OH, OW;
    if (ql_conv_out_size(g, &OH, &OW)) return QL_EINVAL;
    int Cg = g->C / g->groups, Kg = g->K / g->groups;
    for (int n = 0; n < g->N; n++)
        for (int k = 0; k < g->K; k++) {
            int grp = k / Kg;
            for (int oh = 0; oh < OH; oh++)
                for (int ow = 0; ow < OW; ow++) {
                    size_t yi = (((size_t)n * g->K + k) * OH + oh) * OW + ow;
                    float acc = 0.0f;
                    for (int c = 0; c < Cg; c++)
                        for (int kh = 0; kh < g->KH; kh++)
                            for (int kw = 0; kw < g->KW; kw++) {
                                int ih = oh * g->SH - g->PH + kh * g->DH, iw = ow * g->SW - g->PW + kw * g->DW;
                                if (ih < 0 || ih >= g->H || iw < 0 || iw >= g->W) continue;
                                size_t wi = (((size_t)k * Cg + c) * g->KH + kh) * g->KW + kw;
                                size_t xi = (((size_t)n * g->C + grp * Cg + c) * g->H + ih) * g->W + iw;
                                switch (pass) {
                                case REF_FWD: acc += w_or_x[wi] * x_or_dy[xi]; break;               /* y += w x   */
                                case REF_BWD_DATA: y_or_dx_or_dw[xi] += x_or_dy[yi] * w_or_x[wi]; break; /* dx += dy w */
                                case REF_BWD_WEIGHT: y_or_dx_or_dw[wi] += b_or_dy[yi] * w_or_x[xi]; break; /* dw += dy x */
                                }
                            }
                    if (pass == REF_FWD) y_or_dx_or_dw[yi] = (b_or_dy ? b_or_dy[k] : 0.0f) + acc;
                    if (pass == REF_BWD_WEIGHT && db) db[k] += b_or_dy[yi];
                }
        }
    return QL_OK;
}

int ql_conv2d_fwd_ref(float *y, const float *x, const float *w, const float *b, const ql_conv_geom *g) {
    return conv_ref(REF_FWD, g, y, NULL, x, w, b);
}

int ql_conv2d_bwd_data_ref(float *dx, const float *dy, const float *w, const ql_conv_geom *g) {
    return conv_ref(REF_BWD_DATA, g, dx, NULL, dy, w, NULL);
}

int ql_conv2d_bwd_weight_ref(float *dw, float *db, const float *dy, const float *x, const ql_conv_geom *g) {
    return conv_ref(REF_BWD_WEIGHT, g, dw, db, NULL, x, dy);
}

/* ---------------------------------------------------------------------------------------- */
/* Fast drivers: im2col + SGEMM.                                                             */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    const ql_conv_geom *g;
    int OH, OW, Cg, Kg, isa, pointwise, per_image_parallel, tasks;
    const float *x, *w, *b, *dy;
    float *y, *dx, *dw_partials;
    /* the weights as the GEMM's packed A, once per call (or by the caller: prepacked) for every
     * image (per group, `apack_group` floats apart); NULL: each GEMM packs them itself */
    float *apack;
    size_t apack_group;
    size_t wsize;
    int images_per_gemm; /* forward and data gradient: images side by side in one GEMM */
    _Atomic int status;
} conv_job;

static _Thread_local ql_scratch tl_col, tl_pad;

/* ---------------------------------------------------------------------------------------- */
/* Implicit GEMM: the im2col matrix packed straight from the image                           */
/* ---------------------------------------------------------------------------------------- */
/* The GEMM's packing step copies its operands into panels anyway; reading the image there,
 * instead of an im2col matrix written just before, saves writing and re-reading that matrix
 * (KH*KW times the image: it took a fifth of a 3x3 conv's forward time). The image is first
 * copied with its padding as zeros (1/KH*KW of the matrix's size), so that every tap of every
 * pixel is a plain load: col[(ci, kh, kw)][(oh, ow)] = xp[ci][oh*SH + kh*DH][ow*SW + kw*DW].
 * The panels hold the same values as packing the im2col matrix would, so the products are the
 * same bits. */
typedef struct {
    const float *xp; /* Cg planes of Hp x Wp: the image (group) with its padding as zeros */
    int Hp, Wp, OH, OW, KH, KW, SH, SW, DH, DW;
    int col0;          /* the output pixel of the GEMM's column 0 (a thread's share of the pixels) */
    size_t img_stride; /* columns past OH*OW are the next image's pixels, img_stride floats on */
} implicit_src;

/* xp = x with PH rows and PW columns of zeros around each of the C planes. */
void ql_pad_planes(float *restrict xp, const float *restrict x, int C, int H, int W, int PH, int PW) {
    int Wp = W + 2 * PW;
    for (int c = 0; c < C; c++) {
        const float *src = x + (size_t)c * H * W;
        float *dst = xp + (size_t)c * (H + 2 * PH) * Wp;
        memset(dst, 0, sizeof(float) * (size_t)PH * Wp);
        dst += (size_t)PH * Wp;
        for (int h = 0; h < H; h++, dst += Wp) {
            for (int w = 0; w < PW; w++) dst[w] = dst[PW + W + w] = 0.0f;
            memcpy(dst + PW, src + (size_t)h * W, sizeof(float) * (size_t)W);
        }
        memset(dst, 0, sizeof(float) * (size_t)PH * Wp);
    }
}

/* The source of `images` consecutive images' channel group (xg: the first one's, images
 * C*H*W floats apart in x): the images themselves when there is no padding, else padded
 * copies in `scratch`. NULL when the scratch cannot be had. */
static const float *implicit_source(implicit_src *s, ql_scratch *scratch, const float *xg, int images, int Cg,
                                    const ql_conv_geom *g, int OH, int OW) {
    *s = (implicit_src){xg, g->H + 2 * g->PH, g->W + 2 * g->PW, OH, OW, g->KH, g->KW, g->SH, g->SW, g->DH, g->DW, 0,
                        (size_t)g->C * g->H * g->W};
    if (g->PH == 0 && g->PW == 0) return xg;
    size_t padded = (size_t)Cg * s->Hp * s->Wp;
    float *xp = (float *)ql_scratch_reserve(scratch, padded * images * sizeof(float));
    if (!xp) return NULL;
    for (int i = 0; i < images; i++) ql_pad_planes(xp + i * padded, xg + i * s->img_stride, Cg, g->H, g->W, g->PH, g->PW);
    s->xp = xp;
    s->img_stride = padded;
    return xp;
}

/* Column j of the GEMM (from col0): image j / (OH*OW), output pixel (oh, ow) of it. */
typedef struct {
    int n, oh, ow;
} pixel_walk;

static inline pixel_walk pixel_at(const implicit_src *s, int j) {
    int per_image = s->OH * s->OW, r = j % per_image;
    return (pixel_walk){j / per_image, r / s->OW, r % s->OW};
}

static inline ptrdiff_t pixel_offset(const implicit_src *s, pixel_walk w) {
    return (ptrdiff_t)w.n * (ptrdiff_t)s->img_stride + (ptrdiff_t)w.oh * s->SH * s->Wp + (ptrdiff_t)w.ow * s->SW;
}

static inline void pixel_next(const implicit_src *s, pixel_walk *w) {
    if (++w->ow == s->OW) {
        w->ow = 0;
        if (++w->oh == s->OH) { w->oh = 0; w->n++; }
    }
}

/* One row of a B panel: NR floats from src at the panel's column offsets (one copy when the
 * columns are adjacent in memory), zeros past `cols`. */
static inline void gather_row(float *restrict d, const float *src, const ptrdiff_t *off, int cols, int NR, int adjacent) {
    if (adjacent) {
        src += off[0];
        for (int c = 0; c < NR; c++) d[c] = src[c];
    } else {
        for (int c = 0; c < cols; c++) d[c] = src[off[c]];
        for (int c = cols; c < NR; c++) d[c] = 0.0f;
    }
}

/* B = col (rows: taps (ci, kh, kw); columns: output pixels), for the forward. Each panel's
 * pixel offsets are computed once; a panel of pixels adjacent in memory is one copy per row. */
static void implicit_pack_b(const void *ctx, float *Bp, int NR, int j0, int nc, int k0, int kc) {
    const implicit_src *s = (const implicit_src *)ctx;
    size_t plane = (size_t)s->Hp * s->Wp;
    int taps = s->KH * s->KW;
    for (int p = 0; p < nc; p += NR) {
        int cols = ql_min_i(NR, nc - p);
        ptrdiff_t off[32];
        pixel_walk w = pixel_at(s, s->col0 + j0 + p);
        for (int c = 0; c < cols; c++, pixel_next(s, &w)) off[c] = pixel_offset(s, w);
        int adjacent = cols == NR && off[NR - 1] - off[0] == NR - 1;
        float *dst = Bp + (size_t)p * kc;
        int ci = k0 / taps, kh = k0 % taps / s->KW, kw = k0 % s->KW;
        for (int k = 0; k < kc; k++) {
            gather_row(dst + (size_t)k * NR, s->xp + ci * plane + (size_t)kh * s->DH * s->Wp + (size_t)kw * s->DW, off,
                       cols, NR, adjacent);
            if (++kw == s->KW) { kw = 0; if (++kh == s->KH) { kh = 0; ci++; } }
        }
    }
}

/* A = col as the weight gradient's left operand (rows: taps; the depth: output pixels). */
static void implicit_pack_a(const void *ctx, float *Ap, int MR, int i0, int mc, int k0, int kc) {
    const implicit_src *s = (const implicit_src *)ctx;
    size_t plane = (size_t)s->Hp * s->Wp;
    int taps = s->KH * s->KW;
    for (int p = 0; p < mc; p += MR) {
        int rows = ql_min_i(MR, mc - p);
        const float *src[16];
        for (int r = 0; r < rows; r++) {
            int i = i0 + p + r, t = i % taps;
            src[r] = s->xp + (size_t)(i / taps) * plane + (size_t)(t / s->KW) * s->DH * s->Wp + (size_t)(t % s->KW) * s->DW;
        }
        float *dst = Ap + (size_t)p * kc;
        pixel_walk w = pixel_at(s, s->col0 + k0);
        ptrdiff_t o = pixel_offset(s, w), step = s->SW;
        for (int k = 0; k < kc; k++) {
            float *d = dst + (size_t)k * MR;
            for (int r = 0; r < rows; r++) d[r] = src[r][o];
            for (int r = rows; r < MR; r++) d[r] = 0.0f;
            /* the next pixel: one stride on along the row, or the start of the next row */
            if (w.ow + 1 < s->OW) {
                w.ow++;
                o += step;
            } else {
                pixel_next(s, &w);
                o = pixel_offset(s, w);
            }
        }
    }
}

static float *col_scratch(size_t n) { return (float *)ql_scratch_reserve(&tl_col, n * sizeof(float)); }

/* 1x1 kernel, stride 1, no padding: the image itself is the col matrix. */
static int is_pointwise(const ql_conv_geom *g) {
    return g->KH == 1 && g->KW == 1 && g->SH == 1 && g->SW == 1 && g->PH == 0 && g->PW == 0;
}

/* Serial or parallel GEMM: inside a per-image task the pool is busy, so stay serial. */
static void gemm(const conv_job *j, int tA, int tB, int M, int N, int K, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (j->per_image_parallel) ql_sgemm_serial(j->isa, tA, tB, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
    else ql_sgemm_isa((ql_isa)j->isa, tA, tB, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

/* Each group's weights w_g (Kg x KK) as the SGEMM's packed A at `level`, op = transpose when
 * transA, into ap (groups of per_group floats). Returns the first packing error, or QL_OK. */
static int pack_groups(int level, int transA, const float *w, const ql_conv_geom *g, float *ap, size_t per_group) {
    int Kg = g->K / g->groups, KK = g->C / g->groups * g->KH * g->KW;
    for (int grp = 0; grp < g->groups; grp++) {
        int st = ql_sgemm_pack_a((ql_isa)level, transA, transA ? KK : Kg, transA ? Kg : KK, 1.0f, w + (size_t)grp * Kg * KK, KK,
                                 ap + grp * per_group);
        if (st) return st;
    }
    return QL_OK;
}

/* Packs each group's weights as A once: transA 0 for the forward (A = W_g, Kg x KK), 1 for
 * the data gradient (A = W_g^T, KK x Kg). Where the images run in parallel (every image's GEMM
 * would pack the same A again; for small feature maps that costs more than the product), and
 * for any batch in the forward of a conv that is not pointwise (its implicit GEMM reads packed
 * weights). Leaves apack NULL where it does not apply or memory is short. */
static void pack_weights(conv_job *j, int transA) {
    const ql_conv_geom *g = j->g;
    int KK = j->Cg * g->KH * g->KW;
    int M = transA ? KK : j->Kg, K = transA ? j->Kg : KK;
    j->apack = NULL;
    /* the forward packs them for any batch: its implicit GEMM needs them packed */
    int implicit_fwd = !transA && !j->pointwise;
    if (j->isa == QL_ISA_REF || (!implicit_fwd && (!j->per_image_parallel || g->N < 2))) return;
    j->apack_group = ql_sgemm_packed_a_floats((ql_isa)j->isa, M, K);
    if (!j->apack_group) return;
    float *ap = (float *)ql_aligned_alloc(j->apack_group * g->groups * sizeof(float));
    if (!ap) return;
    if (pack_groups(j->isa, transA, j->w, g, ap, j->apack_group)) {
        ql_aligned_free(ap);
        return;
    }
    j->apack = ap;
}

/* C = op(A) B + beta C for group grp, with the packed weights when there are. */
static void gemm_w(conv_job *j, int grp, int tA, int M, int N, int K, const float *A, const float *B, int ldb,
                   float beta, float *C, int ldc) {
    if (!j->apack) gemm(j, tA, 0, M, N, K, A, tA ? M : K, B, ldb, beta, C, ldc);
    else if (ql_sgemm_packed_a_serial((ql_isa)j->isa, M, N, K, j->apack + grp * j->apack_group, 0, B, ldb, beta, C, ldc))
        atomic_store(&j->status, QL_ENOMEM); /* as when the col scratch cannot be had */
}

/* One thread's share of an image's output pixels, for an implicit forward GEMM run by all
 * threads on one image (batches smaller than the thread count). */
typedef struct {
    conv_job *j;
    const implicit_src *src; /* NULL for a pointwise conv: B is the image itself (x) */
    const float *x, *apack;
    float *y;
    int P, chunk;
} columns_job;

static void fwd_columns_task(int t, void *p) {
    const columns_job *c = (const columns_job *)p;
    int lo = t * c->chunk, n = ql_min_i(c->chunk, c->P - lo);
    if (n <= 0) return;
    const ql_conv_geom *g = c->j->g;
    implicit_src s;
    ql_operand_packers pk = {implicit_pack_b, NULL, &s, NULL};
    if (c->src) {
        s = *c->src;
        s.col0 = lo;
    }
    if (ql_sgemm_packers_serial(c->j->isa, c->j->Kg, n, c->j->Cg * g->KH * g->KW, c->apack, 0, c->x + lo, c->P,
                                c->src ? &pk : NULL, c->j->b ? 1.0f : 0.0f, c->y + lo, c->P))
        atomic_store(&c->j->status, QL_ENOMEM);
}

static _Thread_local ql_scratch tl_cblock;

/* Rows k < K of C (cols floats each) set to b[k]: the bias the GEMM then adds to (beta 1). */
static void fill_bias(float *c, int cols, const float *b, int K) {
    for (int k = 0; k < K; k++) {
        float *row = c + (size_t)k * cols;
        for (int i = 0; i < cols; i++) row[i] = b[k];
    }
}

/* Images [n0, n0 + count) in one implicit GEMM per group: their pixels side by side as its
 * columns, so that maps whose pixel count is not a multiple of the tile width (10x10: 100
 * pixels in 7 tiles of 16) fill whole tiles (4 images: 400 = 25 tiles); the product goes to a
 * block buffer and from there to each image's output. Same sums, so the same bits. */
static void fwd_images(conv_job *j, int n0, int count) {
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, KK = j->Cg * g->KH * g->KW, cols = count * P;
    for (int grp = 0; grp < g->groups; grp++) {
        const float *xg = j->x + ((size_t)n0 * g->C + (size_t)grp * j->Cg) * g->H * g->W;
        float *yg = j->y + ((size_t)n0 * g->K + (size_t)grp * j->Kg) * P;
        float *c = count == 1 ? yg : (float *)ql_scratch_reserve(&tl_cblock, (size_t)j->Kg * cols * sizeof(float));
        implicit_src src;
        if (!c || !implicit_source(&src, &tl_pad, xg, count, j->Cg, g, j->OH, j->OW)) {
            atomic_store(&j->status, QL_ENOMEM);
            return;
        }
        if (j->b) fill_bias(c, cols, j->b + grp * j->Kg, j->Kg);
        ql_operand_packers pk = {implicit_pack_b, NULL, &src, NULL};
        if (ql_sgemm_packers_serial(j->isa, j->Kg, cols, KK, j->apack + grp * j->apack_group, 0, NULL, 0, &pk,
                                    j->b ? 1.0f : 0.0f, c, cols)) {
            atomic_store(&j->status, QL_ENOMEM);
            return;
        }
        if (count > 1)
            for (int i = 0; i < count; i++)
                for (int k = 0; k < j->Kg; k++)
                    memcpy(yg + ((size_t)i * g->K + k) * P, c + (size_t)k * cols + (size_t)i * P, sizeof(float) * (size_t)P);
    }
}

static void fwd_images_task(int t, void *p) {
    conv_job *j = (conv_job *)p;
    int n0 = t * j->images_per_gemm;
    fwd_images(j, n0, ql_min_i(j->images_per_gemm, j->g->N - n0));
}

/* How many images share one GEMM: the count that minimises the columns the busiest thread
 * computes, tiles rounded up (ceil(tasks / threads) rounds of ceil(nb * P / NR) tiles), the
 * smallest on a tie; 1 where one image's pixels fill the tiles. At most 4096 columns. */
static int images_per_gemm(int P, int N, int NR, int threads) {
    int best = 1;
    double best_cost = INFINITY;
    for (int nb = 1; nb <= N && (long)nb * P <= 4096; nb++) {
        long tasks = (N + nb - 1) / nb, rounds = (tasks + threads - 1) / threads;
        double cost = (double)rounds * (double)(((long)nb * P + NR - 1) / NR * NR);
        if (cost < best_cost * (1 - 1e-9)) { best = nb; best_cost = cost; }
    }
    return best;
}

static void fwd_image(int n, void *p) {
    conv_job *j = (conv_job *)p;
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, KK = j->Cg * g->KH * g->KW;
    /* implicit GEMM where the weights are packed (every level but the reference); with images
     * in parallel run_images gives such convs to fwd_images, so here only one image at a time
     * runs on all threads */
    int implicit = !j->pointwise && j->apack;
    float *col = j->pointwise || implicit ? NULL : col_scratch((size_t)KK * P);
    if (!j->pointwise && !implicit && !col) { atomic_store(&j->status, QL_ENOMEM); return; }
    for (int grp = 0; grp < g->groups; grp++) {
        const float *xg = j->x + ((size_t)n * g->C + (size_t)grp * j->Cg) * g->H * g->W;
        float *yg = j->y + ((size_t)n * g->K + (size_t)grp * j->Kg) * P;
        if (j->b) fill_bias(yg, P, j->b + grp * j->Kg, j->Kg);
        if (j->apack && !j->per_image_parallel) {
            /* one image on all threads, on the packed weights: each takes a slice of the pixels
             * (whole tiles), read from the image (pointwise) or packed from it (implicit) */
            implicit_src src;
            if (implicit && !implicit_source(&src, &tl_pad, xg, 1, j->Cg, g, j->OH, j->OW)) { atomic_store(&j->status, QL_ENOMEM); return; }
            int threads = ql_get_num_threads(), nr = ql_sgemm_panel_width(j->isa);
            int chunk = ((P + threads - 1) / threads + nr - 1) / nr * nr;
            columns_job cj = {j, implicit ? &src : NULL, xg, j->apack + grp * j->apack_group, yg, P, chunk};
            ql_parallel_for((P + chunk - 1) / chunk, fwd_columns_task, &cj);
            continue;
        }
        if (!j->pointwise) ql_im2col(col, xg, j->Cg, g->H, g->W, g->KH, g->KW, g->SH, g->SW, g->PH, g->PW, g->DH, g->DW);
        const float *B = j->pointwise ? xg : col;
        gemm_w(j, grp, 0, j->Kg, P, KK, j->w + (size_t)grp * j->Kg * KK, B, P, j->b ? 1.0f : 0.0f, yg, P);
    }
}

/* The data gradient's B operand for several images side by side: B[k][j] = dy of image
 * j / P, channel k of the group, pixel j % P. */
typedef struct {
    const float *dy; /* the first image's group */
    size_t img_stride; /* K * P */
    int P;
} dy_src;

static void dy_pack_b(const void *ctx, float *Bp, int NR, int j0, int nc, int k0, int kc) {
    const dy_src *s = (const dy_src *)ctx;
    for (int p = 0; p < nc; p += NR) {
        int cols = ql_min_i(NR, nc - p);
        ptrdiff_t off[32];
        for (int c = 0; c < cols; c++) {
            int j = j0 + p + c;
            off[c] = (ptrdiff_t)(j / s->P) * (ptrdiff_t)s->img_stride + j % s->P;
        }
        int adjacent = cols == NR && off[NR - 1] - off[0] == NR - 1;
        float *dst = Bp + (size_t)p * kc;
        for (int k = 0; k < kc; k++) gather_row(dst + (size_t)k * NR, s->dy + (size_t)(k0 + k) * s->P, off, cols, NR, adjacent);
    }
}

/* Images [n0, n0 + count): col = W^T dy for all of them in one GEMM per group (their pixels
 * side by side, as the forward), then each image's col2im from its columns. */
static void bwd_data_images(conv_job *j, int n0, int count) {
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, KK = j->Cg * g->KH * g->KW, cols = count * P;
    float *col = col_scratch((size_t)KK * cols);
    if (!col) { atomic_store(&j->status, QL_ENOMEM); return; }
    for (int grp = 0; grp < g->groups; grp++) {
        dy_src src = {j->dy + ((size_t)n0 * g->K + (size_t)grp * j->Kg) * P, (size_t)g->K * P, P};
        ql_operand_packers pk = {dy_pack_b, NULL, &src, NULL};
        if (ql_sgemm_packers_serial(j->isa, KK, cols, j->Kg, j->apack + grp * j->apack_group, 0, NULL, 0, &pk, 0.0f, col, cols)) {
            atomic_store(&j->status, QL_ENOMEM);
            return;
        }
        for (int i = 0; i < count; i++)
            col2im_ld(j->dx + ((size_t)(n0 + i) * g->C + (size_t)grp * j->Cg) * g->H * g->W, col + (size_t)i * P, (size_t)cols,
                      j->Cg, g->H, g->W, g->KH, g->KW, g->SH, g->SW, g->PH, g->PW, g->DH, g->DW);
    }
}

static void bwd_data_images_task(int t, void *p) {
    conv_job *j = (conv_job *)p;
    int n0 = t * j->images_per_gemm;
    bwd_data_images(j, n0, ql_min_i(j->images_per_gemm, j->g->N - n0));
}

static void bwd_data_image(int n, void *p) {
    conv_job *j = (conv_job *)p;
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, KK = j->Cg * g->KH * g->KW;
    float *col = j->pointwise ? NULL : col_scratch((size_t)KK * P);
    if (!j->pointwise && !col) { atomic_store(&j->status, QL_ENOMEM); return; }
    for (int grp = 0; grp < g->groups; grp++) {
        float *dxg = j->dx + ((size_t)n * g->C + (size_t)grp * j->Cg) * g->H * g->W;
        const float *dyg = j->dy + ((size_t)n * g->K + (size_t)grp * j->Kg) * P;
        const float *wg = j->w + (size_t)grp * j->Kg * KK;
        if (j->pointwise) { /* dx[Cg, P] += W^T[Cg, Kg] dy[Kg, P] */
            gemm_w(j, grp, 1, KK, P, j->Kg, wg, dyg, P, 1.0f, dxg, P);
        } else {
            gemm_w(j, grp, 1, KK, P, j->Kg, wg, dyg, P, 0.0f, col, P);
            ql_col2im(dxg, col, j->Cg, g->H, g->W, g->KH, g->KW, g->SH, g->SW, g->PH, g->PW, g->DH, g->DW);
        }
    }
}

/* B = dy^T for the weight gradient, several images: B[k][c] = dy of image k / P, channel c of
 * the group, pixel k % P. */
static void dyt_pack_b(const void *ctx, float *Bp, int NR, int j0, int nc, int k0, int kc) {
    const dy_src *s = (const dy_src *)ctx;
    for (int p = 0; p < nc; p += NR) {
        int cols = ql_min_i(NR, nc - p), n = k0 / s->P, pix = k0 % s->P;
        const float *chan[32];
        for (int c = 0; c < cols; c++) chan[c] = s->dy + (size_t)(j0 + p + c) * s->P;
        float *dst = Bp + (size_t)p * kc;
        for (int k = 0; k < kc; k++) {
            size_t o = (size_t)n * s->img_stride + (size_t)pix;
            float *d = dst + (size_t)k * NR;
            for (int c = 0; c < cols; c++) d[c] = chan[c][o];
            for (int c = cols; c < NR; c++) d[c] = 0.0f;
            if (++pix == s->P) { pix = 0; n++; }
        }
    }
}

/* Images per weight-gradient GEMM: enough for a depth of 2048 pixels (one image from 2048 on). */
static int weight_grad_images(int P) { return ql_max_i(1, (2048 + P - 1) / P); }

/* Task t handles images [t*N/T, (t+1)*N/T) and accumulates into its own partial dW. */
static void bwd_weight_task(int t, void *p) {
    conv_job *j = (conv_job *)p;
    const ql_conv_geom *g = j->g;
    int P = j->OH * j->OW, KK = j->Cg * g->KH * g->KW;
    int n0 = (int)((long)t * g->N / j->tasks), n1 = (int)((long)(t + 1) * g->N / j->tasks);
    float *dw = j->dw_partials + (size_t)t * j->wsize;
    /* implicit where this task's GEMMs run serially (images in parallel) */
    int implicit = !j->pointwise && j->per_image_parallel && j->isa != QL_ISA_REF;
    float *col = j->pointwise || implicit ? NULL : col_scratch((size_t)KK * P);
    if (!j->pointwise && !implicit && !col) { atomic_store(&j->status, QL_ENOMEM); return; }
    /* implicit: up to weight_grad_images(P) images per GEMM, their pixels one long depth, so
     * that a small map's few pixels do not cost a pass over dW's block each */
    int step = implicit ? ql_min_i(n1 - n0, weight_grad_images(P)) : 1;
    for (int n = n0; n < n1; n += step) {
        int count = ql_min_i(step, n1 - n);
        for (int grp = 0; grp < g->groups; grp++) {
            const float *xg = j->x + ((size_t)n * g->C + (size_t)grp * j->Cg) * g->H * g->W;
            const float *dyg = j->dy + ((size_t)n * g->K + (size_t)grp * j->Kg) * P;
            float beta = n == n0 ? 0.0f : 1.0f, *dwg = dw + (size_t)grp * j->Kg * KK;
            /* dW_g^T[KK, Kg] += col[KK, P] * dy_g^T[P, Kg]: the large operand (col) is packed
             * row-wise and only the small dy is transposed; transposed back in the reduction */
            if (implicit) { /* col's panels packed from the images (implicit_pack_a), dy^T's from dy */
                implicit_src src;
                if (!implicit_source(&src, &tl_pad, xg, count, j->Cg, g, j->OH, j->OW)) { atomic_store(&j->status, QL_ENOMEM); return; }
                dy_src dys = {dyg, (size_t)g->K * P, P};
                ql_operand_packers pk = {count > 1 ? dyt_pack_b : NULL, implicit_pack_a, &src, &dys};
                if (ql_sgemm_packers_serial(j->isa, KK, j->Kg, count * P, NULL, 1, dyg, P, &pk, beta, dwg, j->Kg))
                    atomic_store(&j->status, QL_ENOMEM);
                continue;
            }
            if (!j->pointwise) ql_im2col(col, xg, j->Cg, g->H, g->W, g->KH, g->KW, g->SH, g->SW, g->PH, g->PW, g->DH, g->DW);
            gemm(j, 0, 1, KK, j->Kg, P, j->pointwise ? xg : col, P, dyg, P, beta, dwg, j->Kg);
        }
    }
}

static int setup(conv_job *j, const ql_conv_geom *g) {
    memset(j, 0, sizeof *j);
    if (ql_conv_out_size(g, &j->OH, &j->OW)) return QL_EINVAL;
    j->g = g;
    j->Cg = g->C / g->groups;
    j->Kg = g->K / g->groups;
    j->isa = ql_isa_best();
    j->pointwise = is_pointwise(g);
    /* Images in parallel when there are enough of them; otherwise parallel GEMMs. */
    j->per_image_parallel = g->N >= ql_get_num_threads() && ql_get_num_threads() > 1;
    j->wsize = (size_t)g->K * j->Cg * g->KH * g->KW;
    return QL_OK;
}

/* The images of a forward or data-gradient call: groups of images per GEMM on the pool where
 * the weights are packed and the map is not pointwise (`batched`), else image by image
 * (`single`), on the pool when the batch is at least the thread count. */
static void run_images(conv_job *j, ql_task_fn batched, ql_task_fn single) {
    int N = j->g->N;
    if (j->per_image_parallel && !j->pointwise && j->apack) {
        j->images_per_gemm = images_per_gemm(j->OH * j->OW, N, ql_sgemm_panel_width(j->isa), ql_get_num_threads());
        ql_parallel_for((N + j->images_per_gemm - 1) / j->images_per_gemm, batched, j);
    } else if (j->per_image_parallel) {
        ql_parallel_for(N, single, j);
    } else {
        for (int n = 0; n < N; n++) single(n, j);
    }
}

/* The direct kernel (conv_direct.c) takes the convs it applies to at the level in force,
 * but not pointwise ones (their GEMM reads the image as it is; the direct kernel would first
 * transpose it) */
static int uses_direct(int level, const ql_conv_geom *g) { return !is_pointwise(g) && ql_conv_direct_applies(level, g); }

static const ql_layout nchw_layout = {0, 0, 0};
static int conv_fwd_through_nchw(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *w, const float *b,
                                 const ql_conv_geom *g, const float *prepacked, int level, int act, int OH, int OW);

/* The forward with the weights packed by the caller (prepacked, for level `level`), or
 * packed here (prepacked NULL, or packed for another level); act 1: ReLU on the output, 2:
 * SiLU. x and y in the layouts xlay and ylay (ql_conv2d_fwd_prepacked_layout; checked by the
 * caller): the direct kernel reads and writes them as they are, the GEMM route through NCHW
 * copies. */
static int conv_fwd(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *w, const float *b,
                    const ql_conv_geom *g, const float *prepacked, int level, int act) {
    conv_job j;
    if (setup(&j, g)) return QL_EINVAL;
    int own = !(prepacked && level == j.isa && j.isa != QL_ISA_REF);
    if (uses_direct(j.isa, g)) {
        float *wp = own ? (float *)ql_aligned_alloc(ql_conv_direct_packed_floats(g) * sizeof(float)) : (float *)prepacked;
        if (!wp) return QL_ENOMEM;
        if (own) ql_conv_direct_pack(wp, w, g);
        int st = ql_conv_direct_fwd_layout(y, ylay, x, xlay, wp, b, g, act, 0);
        if (own) ql_aligned_free(wp);
        return st;
    }
    if (xlay.nhwc || ylay.nhwc) return conv_fwd_through_nchw(y, ylay, x, xlay, w, b, g, prepacked, level, act, j.OH, j.OW);
    j.x = x; j.w = w; j.b = b; j.y = y;
    if (own) {
        pack_weights(&j, 0);
    } else {
        j.apack = (float *)prepacked;
        j.apack_group = ql_sgemm_packed_a_floats((ql_isa)j.isa, j.Kg, j.Cg * g->KH * g->KW);
    }
    run_images(&j, fwd_images_task, fwd_image);
    if (own) ql_aligned_free(j.apack);
    /* the activation op itself, in place, on the GEMM route's output */
    if (act) ql_unary_fwd_isa((ql_isa)j.isa, act == 1 ? QL_UNARY_RELU : QL_UNARY_SILU, y, y, (int64_t)g->N * g->K * j.OH * j.OW);
    return atomic_load(&j.status);
}

int ql_conv2d_fwd(float *y, const float *x, const float *w, const float *b, const ql_conv_geom *g) {
    return conv_fwd(y, nchw_layout, x, nchw_layout, w, b, g, NULL, -1, 0);
}

size_t ql_conv2d_fwd_packed_floats(const ql_conv_geom *g) {
    int OH, OW, level = ql_isa_best();
    if (ql_conv_out_size(g, &OH, &OW) || level == QL_ISA_REF) return 0;
    if (uses_direct(level, g)) return ql_conv_direct_packed_floats(g);
    return ql_sgemm_packed_a_floats((ql_isa)level, g->K / g->groups, g->C / g->groups * g->KH * g->KW) * (size_t)g->groups;
}

int ql_conv2d_fwd_pack(float *packed, const float *w, const ql_conv_geom *g) {
    int OH, OW, level = ql_isa_best();
    if (ql_conv_out_size(g, &OH, &OW) || !packed || !w) return QL_EINVAL;
    if (level == QL_ISA_REF) return QL_EUNSUPPORTED;
    if (uses_direct(level, g)) {
        ql_conv_direct_pack(packed, w, g);
        return level;
    }
    size_t per_group = ql_sgemm_packed_a_floats((ql_isa)level, g->K / g->groups, g->C / g->groups * g->KH * g->KW);
    int st = pack_groups(level, 0, w, g, packed, per_group);
    return st ? st : level;
}

int ql_conv2d_fwd_prepacked(float *y, const float *x, const float *w, const float *packed, int level, const float *b,
                            const ql_conv_geom *g, int act) {
    if (act < 0 || act > 2) return QL_EINVAL;
    return conv_fwd(y, nchw_layout, x, nchw_layout, w, b, g, packed, level, act);
}

int ql_conv2d_fwd_direct(const ql_conv_geom *g) {
    int OH, OW;
    return !ql_conv_out_size(g, &OH, &OW) && uses_direct(ql_isa_best(), g);
}

void ql_nchw_to_nhwc(float *restrict dst, const float *restrict src, int N, int C, int H, int W, int ph, int pw) {
    int Hp = H + 2 * ph, Wp = W + 2 * pw;
    for (int n = 0; n < N; n++)
        for (int hp = 0; hp < Hp; hp++)
            for (int wp = 0; wp < Wp; wp++) {
                float *d = dst + (((size_t)n * Hp + hp) * Wp + wp) * C;
                int h = hp - ph, w = wp - pw, inside = h >= 0 && h < H && w >= 0 && w < W;
                for (int c = 0; c < C; c++) d[c] = inside ? src[(((size_t)n * C + c) * H + h) * W + w] : 0.0f;
            }
}

void ql_nhwc_to_nchw(float *restrict dst, const float *restrict src, int N, int C, int H, int W, int ph, int pw) {
    int Hp = H + 2 * ph, Wp = W + 2 * pw;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int h = 0; h < H; h++)
                for (int w = 0; w < W; w++)
                    dst[(((size_t)n * C + c) * H + h) * W + w] = src[(((size_t)n * Hp + h + ph) * Wp + w + pw) * C + c];
}

int ql_conv2d_fwd_prepacked_layout(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *w, const float *packed,
                                   int level, const float *b, const ql_conv_geom *g, int act) {
    if (act < 0 || act > 2 || (xlay.nhwc && (xlay.ph != g->PH || xlay.pw != g->PW)) || (ylay.nhwc && (ylay.ph < 0 || ylay.pw < 0)))
        return QL_EINVAL;
    return conv_fwd(y, ylay, x, xlay, w, b, g, packed, level, act);
}

/* conv_fwd on a route that takes NCHW only: the NHWC operands converted to NCHW copies and back. */
static int conv_fwd_through_nchw(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *w, const float *b,
                                 const ql_conv_geom *g, const float *prepacked, int level, int act, int OH, int OW) {
    size_t xn = (size_t)g->N * g->C * g->H * g->W, yn = (size_t)g->N * g->K * OH * OW;
    float *xc = xlay.nhwc ? (float *)ql_aligned_alloc(sizeof(float) * (xn ? xn : 1)) : NULL;
    float *yc = ylay.nhwc ? (float *)ql_aligned_alloc(sizeof(float) * (yn ? yn : 1)) : NULL;
    int st = QL_ENOMEM;
    if ((!xlay.nhwc || xc) && (!ylay.nhwc || yc)) {
        if (xc) ql_nhwc_to_nchw(xc, x, g->N, g->C, g->H, g->W, g->PH, g->PW);
        st = conv_fwd(yc ? yc : y, nchw_layout, xc ? xc : x, nchw_layout, w, b, g, prepacked, level, act);
        if (yc && st == QL_OK) ql_nchw_to_nhwc(y, yc, g->N, g->K, OH, OW, ylay.ph, ylay.pw);
    }
    ql_aligned_free(xc);
    ql_aligned_free(yc);
    return st;
}

/* The data gradient of a stride-1 conv is itself a stride-1 conv: dx = conv(dy) with the
 * weights transposed (in and out channels swapped) and flipped, padding D*(KH-1) - PH (the
 * adjoint's geometry, output H x W), so the direct kernel computes it without the col matrix
 * and col2im's pass over it: dx += that conv, summed over (k, kh, kw) slabs as the forward
 * sums. Where it applies: the direct kernel's level, one group, stride 1, not pointwise, and
 * padding at most D*(K-1). Returns QL_EUNSUPPORTED where it does not. */
static int bwd_data_direct(float *dx, const float *dy, const float *w, const ql_conv_geom *g, int level, int OH, int OW) {
    ql_conv_geom t = {g->N, g->K, OH, OW, g->C, g->KH, g->KW, 1, 1, g->DH * (g->KH - 1) - g->PH, g->DW * (g->KW - 1) - g->PW,
                      g->DH, g->DW, 1};
    if (!uses_direct(level, g) || g->SH != 1 || g->SW != 1 || t.PH < 0 || t.PW < 0) return QL_EUNSUPPORTED;
    size_t KK = (size_t)g->C * g->KH * g->KW, taps = (size_t)g->KH * g->KW;
    float *wt = (float *)ql_aligned_alloc(KK * g->K * sizeof(float));
    float *wp = (float *)ql_aligned_alloc(ql_conv_direct_packed_floats(&t) * sizeof(float));
    int st = QL_ENOMEM;
    if (wt && wp) {
        /* wt[c][k][kh][kw] = w[k][c][KH-1-kh][KW-1-kw] */
        for (int k = 0; k < g->K; k++)
            for (int c = 0; c < g->C; c++)
                for (size_t i = 0; i < taps; i++) wt[((size_t)c * g->K + k) * taps + i] = w[((size_t)k * g->C + c) * taps + taps - 1 - i];
        ql_conv_direct_pack(wp, wt, &t);
        st = ql_conv_direct_fwd(dx, dy, wp, NULL, &t, 0, 1);
    }
    ql_aligned_free(wt);
    ql_aligned_free(wp);
    return st;
}

int ql_conv2d_bwd_data(float *dx, const float *dy, const float *w, const ql_conv_geom *g) {
    conv_job j;
    if (setup(&j, g)) return QL_EINVAL;
    int direct = bwd_data_direct(dx, dy, w, g, j.isa, j.OH, j.OW);
    if (direct != QL_EUNSUPPORTED) return direct;
    j.dx = dx; j.dy = dy; j.w = w;
    pack_weights(&j, 1);
    run_images(&j, bwd_data_images_task, bwd_data_image);
    ql_aligned_free(j.apack);
    return atomic_load(&j.status);
}

static int bwd_weight_gemm(conv_job *j, float *dw, const float *dy, const float *x);

int ql_conv2d_bwd_weight(float *dw, float *db, const float *dy, const float *x, const ql_conv_geom *g) {
    conv_job j;
    if (setup(&j, g)) return QL_EINVAL;
    if (g->N == 0) return QL_OK;
    /* the direct kernel for pointwise convs too (it reads the image without transposing it;
     * 1x1 32->32 40x40 batch 32: 59 -> 76 GFLOP/s) */
    int st = ql_conv_direct_applies(j.isa, g) ? ql_conv_direct_bwd_weight(dw, dy, x, g) : QL_EUNSUPPORTED;
    if (st == QL_EUNSUPPORTED) st = bwd_weight_gemm(&j, dw, dy, x);
    /* db[k] += the sum of dy's channel k over images and pixels */
    if (st == QL_OK && db) {
        int P = j.OH * j.OW;
        for (int n = 0; n < g->N; n++)
            for (int k = 0; k < g->K; k++) db[k] += (float)ql_sum(dy + ((size_t)n * g->K + k) * P, P);
    }
    return st;
}

/* The weight gradient through im2col (implicit) panels and SGEMM: each task's images into a
 * dW^T partial, the partials added in task order. */
static int bwd_weight_gemm(conv_job *j, float *dw, const float *dy, const float *x) {
    const ql_conv_geom *g = j->g;
    j->dy = dy; j->x = x;
    j->tasks = j->per_image_parallel ? ql_get_num_threads() : 1;
    if (j->tasks > g->N) j->tasks = g->N;
    j->dw_partials = (float *)ql_aligned_alloc(j->wsize * j->tasks * sizeof(float));
    if (!j->dw_partials) return QL_ENOMEM;
    if (j->tasks > 1) ql_parallel_for(j->tasks, bwd_weight_task, j);
    else bwd_weight_task(0, j);
    /* Fixed-order reduction of the per-task dW^T blocks: deterministic for a thread count. */
    int KK = j->Cg * g->KH * g->KW;
    for (int t = 0; t < j->tasks; t++)
        for (int grp = 0; grp < g->groups; grp++) {
            const float *src = j->dw_partials + (size_t)t * j->wsize + (size_t)grp * j->Kg * KK; /* [KK, Kg] */
            float *dst = dw + (size_t)grp * j->Kg * KK;                                         /* [Kg, KK] */
            for (int k = 0; k < j->Kg; k++)
                for (int i = 0; i < KK; i++) dst[(size_t)k * KK + i] += src[(size_t)i * j->Kg + k];
        }
    ql_aligned_free(j->dw_partials);
    return atomic_load(&j->status);
}
