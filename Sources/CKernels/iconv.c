/* Direct INT8 convolution on NHWC codes: the engine's conv without im2col (contract in
 * ckernels.h, ql_iconv_nhwc_*).
 *
 * The im2col route (qtensor.c + igemm.c) copies every input pixel KH*KW times into a column
 * matrix, then copies that matrix again into the micro-kernel's row panels. On a 3x3 conv that
 * is 18 bytes written and read per input byte before a single multiply, and on the detector it
 * was more than half of the INT8 time. Here the micro-kernel reads A straight from the NHWC
 * input: for a block of output pixels it computes, once, a pointer per pixel and kernel tap to
 * that tap's C input bytes (or to a row of zeros where the tap falls in the padding), and the
 * reduction runs tap by tap over those pointers, 4 channels (one int32 word) at a time. This
 * is the "indirection buffer" of onnxruntime's MLAS ConvSym kernels, read here to understand
 * and written our own way.
 *
 * The weights are the packed B operand of igemm.c for the depth KH*KW*C in (kh, kw, c) order,
 * the order of the NHWC im2col, so one packing serves both routes. C % 4 == 0, so that a
 * k-group of 4 bytes never straddles two taps (the engine pads a 3-channel image to 4).
 *
 * Two AVX2 kernels, both exact (every s16 pair sum of `vpmaddubsw` stays below 32767):
 *   - codes >= 0 (post-ReLU): igemm.c's `vpmaddubsw` kernel; the codes are their own u8 view,
 *     at most 127, so |a1*b1 + a2*b2| <= 2*127*128 = 32512.
 *   - signed codes (e.g. after SiLU): a*b = |a| * (b * sign(a)), i.e. `vpmaddubsw` of
 *     `vpabsb(a)` (u8, at most 128) with `vpsignb(b, a)`; exact while no weight is -128 (its
 *     negation wraps), so the route checks the packed weights and declines if one is:
 *     |pair| <= 2*128*127 = 32512. Five more instructions per 32 products than the first.
 * Accumulation is exact int32 either way and the epilogue is igemm.c's, so the result is bit
 * for bit the im2col route's. A tap that both pixels of a pair read in the padding (the top and
 * bottom rows of a map: a third of a 3x3 window) adds only zeros and is skipped: on a 10x10 map
 * that is 1/15 of the conv's multiplies, on a 5x5 map 2/15.
 *
 * On an AVX-512 machine the AVX2 kernels run as they are (every AVX-512 CPU has AVX2); there
 * is no direct VNNI (`vpdpbusd`) kernel yet. Whether they beat the im2col + VNNI GEMM there
 * depends on the layer (the GEMM multiplies 2-4x faster; im2col costs most on narrow convs and
 * small maps), so the engine times both routes on the machine and keeps the faster per conv
 * (Int8Conv's route choice), as TensorRT's builder times its tactics.
 *
 * Not here: grouped convs, C % 4 != 0. Those return QL_EUNSUPPORTED and the caller takes the
 * im2col route. */
#include <immintrin.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include "internal.h"

#define NRI 32 /* the packed B panel width of igemm.c */
#define MB 32  /* output pixels per block: their tap pointers are computed once per block */

typedef void (*dk_fn)(const uint8_t *const *r0, const uint8_t *const *r1, int taps, int cq,
                      const int8_t *b, int32_t *tile, const uint8_t *zero);

/* Two output pixels x 32 columns of one B panel, over every tap and channel group; writes the
 * int32 sums to tile rows 0 and 1 (stride NRI). The reference: scalar, codes as s8, reading the
 * documented panel layout (byte (c*4 + r) of group q is B[4q + r, c]). It multiplies every tap;
 * `zero` (the padding's row of zero codes, or NULL) is for the fast kernels, which skip a tap
 * that both pixels read there: its products are all 0, so the int32 sums are the same. */
static void dk_ref(const uint8_t *const *r0, const uint8_t *const *r1, int taps, int cq,
                   const int8_t *b, int32_t *tile, const uint8_t *zero) {
    for (int i = 0; i < 2 * NRI; i++) tile[i] = 0;
    for (int t = 0; t < taps; t++)
        for (int q = 0; q < cq; q++, b += 128)
            for (int c = 0; c < NRI; c++)
                for (int r = 0; r < 4; r++) {
                    tile[c] += (int32_t)(int8_t)r0[t][4 * q + r] * b[c * 4 + r];
                    tile[NRI + c] += (int32_t)(int8_t)r1[t][4 * q + r] * b[c * 4 + r];
                }
}

/* The two AVX2 kernels (see the top), 8 accumulators + 4 B + A and ones: for non-negative
 * codes igemm.c's ukr_avx2_u7 with A's words read through the tap pointers instead of a packed
 * panel; for signed codes (no weight -128) a*b = |a| * sign(b, a). `signed_codes` is a
 * constant in each caller, so each gets its own loop. `nv`, also a constant: the panel's
 * first nv groups of 8 columns are computed (4: all 32; 2 or 1 for a conv of at most 16 or 8
 * output channels, e.g. the 16-channel stem, whose panel is half zeros): the tile's other
 * columns are left as they are, and the epilogue does not read them. */
__attribute__((target("avx2"), always_inline)) static inline void
dk_avx2(const uint8_t *const *r0, const uint8_t *const *r1, int taps, int cq, const int8_t *b, int32_t *tile,
        const uint8_t *zero, const int signed_codes, const int nv) {
    __m256i c0[4], c1[4];
    for (int s = 0; s < nv; s++) c0[s] = c1[s] = _mm256_setzero_si256();
    for (int t = 0; t < taps; t++) {
        const uint8_t *a0 = r0[t], *a1 = r1[t];
        if (zero && a0 == zero && a1 == zero) { /* a tap both pixels read in the padding: its products are all 0 */
            b += (size_t)cq * 128;
            continue;
        }
        for (int q = 0; q < cq; q++, b += 128) {
            __m256i bs[4];
            for (int s = 0; s < nv; s++) bs[s] = _mm256_loadu_si256((const __m256i *)(b + 32 * s));
            int32_t w0, w1;
            memcpy(&w0, a0 + 4 * q, 4);
            memcpy(&w1, a1 + 4 * q, 4);
            __m256i x0 = _mm256_set1_epi32(w0), x1 = _mm256_set1_epi32(w1);
            for (int s = 0; s < nv; s++) {
                c0[s] = _mm256_add_epi32(c0[s], ql_dot4_u8s8(x0, bs[s], signed_codes));
                c1[s] = _mm256_add_epi32(c1[s], ql_dot4_u8s8(x1, bs[s], signed_codes));
            }
        }
    }
    for (int s = 0; s < nv; s++) {
        _mm256_storeu_si256((__m256i *)(tile + 8 * s), c0[s]);
        _mm256_storeu_si256((__m256i *)(tile + NRI + 8 * s), c1[s]);
    }
}

/* Each variant has two loops: one for pairs with an edge pixel (zero given: the test per tap)
 * and one, the common case, with the test compiled out (zero NULL). */
#define DK_VARIANT(name, signed_codes, nv)                                                                         \
    __attribute__((target("avx2"))) static void name(const uint8_t *const *r0, const uint8_t *const *r1, int taps, int cq, \
                                                     const int8_t *b, int32_t *tile, const uint8_t *zero) {                \
        if (zero) dk_avx2(r0, r1, taps, cq, b, tile, zero, signed_codes, nv);                                              \
        else dk_avx2(r0, r1, taps, cq, b, tile, NULL, signed_codes, nv);                                                   \
    }
DK_VARIANT(dk_avx2_u7, 0, 4)
DK_VARIANT(dk_avx2_u7_16, 0, 2)
DK_VARIANT(dk_avx2_u7_8, 0, 1)
DK_VARIANT(dk_avx2_s7, 1, 4)
DK_VARIANT(dk_avx2_s7_16, 1, 2)
DK_VARIANT(dk_avx2_s7_8, 1, 1)

typedef struct {
    const ql_conv_geom *g;
    int OH, OW, M, panels, taps, cq, isa, to_s8, split_n, chunk;
    dk_fn kernel, kernel16, kernel8; /* all 32 columns of a panel; at most 16; at most 8 */
    const int8_t *x;
    const int8_t *packed;
    const ql_requant_params *ep;
    void *out;
    _Atomic int status;
} iconv_job;

static _Thread_local ql_scratch tl_ptrs, tl_tile, tl_zero;

static void iconv_task(int t, void *p) {
    iconv_job *j = (iconv_job *)p;
    const ql_conv_geom *g = j->g;
    int m0 = 0, m1 = j->M, p0 = 0, p1 = j->panels;
    if (j->split_n) {
        p0 = t * j->chunk;
        p1 = ql_min_i(p0 + j->chunk, j->panels);
    } else {
        m0 = t * j->chunk;
        m1 = ql_min_i(m0 + j->chunk, j->M);
    }
    if (m0 >= m1 || p0 >= p1) return;
    const int taps = j->taps, C = g->C, K = g->K, Kq = taps * j->cq;
    const uint8_t **ptrs = (const uint8_t **)ql_scratch_reserve(&tl_ptrs, sizeof(void *) * (size_t)MB * taps);
    int32_t *tile = (int32_t *)ql_scratch_reserve(&tl_tile, sizeof(int32_t) * MB * NRI);
    uint8_t *zero = (uint8_t *)ql_scratch_reserve(&tl_zero, (size_t)C);
    if (!ptrs || !tile || !zero) {
        atomic_store(&j->status, QL_ENOMEM);
        return;
    }
    memset(zero, 0, (size_t)C);
    ptrdiff_t tap_offset[64]; /* taps <= 64 (checked in iconv_run) */
    for (int kh = 0, tap = 0; kh < g->KH; kh++)
        for (int kw = 0; kw < g->KW; kw++, tap++) tap_offset[tap] = ((ptrdiff_t)kh * g->DH * g->W + (ptrdiff_t)kw * g->DW) * C;
    const ql_requant_params *ep = j->ep;
    const uint8_t *x = (const uint8_t *)j->x; /* the kernels reinterpret the bytes */
    for (int mb = m0; mb < m1; mb += MB) {
        int rows = ql_min_i(MB, m1 - mb);
        /* the block's first pixel by division, the others by stepping (a division per pixel
         * was a tenth of the 3-channel stem's time) */
        int n = mb / (j->OH * j->OW), oh = (mb / j->OW) % j->OH, ow = mb % j->OW;
        unsigned char edge[MB]; /* pixel r's window reaches into the padding */
        for (int r = 0; r < rows; r++, ow++) {
            if (ow == j->OW) {
                ow = 0;
                if (++oh == j->OH) oh = 0, n++;
            }
            const uint8_t **pr = ptrs + (size_t)r * taps;
            int ih0 = oh * g->SH - g->PH, iw0 = ow * g->SW - g->PW;
            edge[r] = !(ih0 >= 0 && ih0 + (g->KH - 1) * g->DH < g->H && iw0 >= 0 && iw0 + (g->KW - 1) * g->DW < g->W);
            if (!edge[r]) {
                /* the whole window inside the image: the window's first byte plus fixed offsets */
                const uint8_t *base = x + (((size_t)n * g->H + ih0) * g->W + iw0) * C;
                for (int tap = 0; tap < taps; tap++) pr[tap] = base + tap_offset[tap];
                continue;
            }
            for (int kh = 0; kh < g->KH; kh++) {
                int ih = ih0 + kh * g->DH;
                for (int kw = 0; kw < g->KW; kw++) {
                    int iw = iw0 + kw * g->DW;
                    *pr++ = (ih < 0 || ih >= g->H || iw < 0 || iw >= g->W)
                                ? zero
                                : x + (((size_t)n * g->H + ih) * g->W + iw) * C;
                }
            }
        }
        for (int pn = p0; pn < p1; pn++) {
            const int8_t *bp = j->packed + (size_t)pn * Kq * 128;
            int cols = ql_min_i(NRI, K - pn * NRI);
            dk_fn kernel = cols <= 8 ? j->kernel8 : cols <= 16 ? j->kernel16 : j->kernel;
            /* an odd last pixel is computed twice (its pointers as both rows); tile has MB rows
             * and MB is even, so row `rows` exists whenever rows is odd */
            for (int r = 0; r < rows; r += 2) {
                const uint8_t *const *ra = ptrs + (size_t)r * taps;
                int pair = r + 1 < rows;
                /* the kernel skips taps both pixels read in the padding (zero is their pointer);
                 * only two edge pixels can have such a tap */
                kernel(ra, pair ? ra + taps : ra, taps, j->cq, bp, tile + (size_t)r * NRI,
                       edge[r] && (!pair || edge[r + 1]) ? zero : NULL);
            }
            int n0 = pn * NRI;
            int st = ql_epilogue_block(j->isa, j->to_s8, j->out, K, mb, n0, rows, ql_min_i(NRI, K - n0), tile, NRI, ep);
            if (st) {
                atomic_store(&j->status, st);
                return;
            }
        }
    }
}

/* Whether no byte of x[0..n) has its top bit set (as codes: all >= 0). The caller's thread
 * scans the whole input before the tasks start, so the scan is vectorised where it can be. */
__attribute__((target("avx2"))) static int no_top_bit_avx2(const int8_t *x, size_t n, size_t *done) {
    __m256i any = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 128 <= n; i += 128)
        any = _mm256_or_si256(any, _mm256_or_si256(_mm256_or_si256(_mm256_loadu_si256((const __m256i *)(x + i)),
                                                                    _mm256_loadu_si256((const __m256i *)(x + i + 32))),
                                                    _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(x + i + 64)),
                                                                    _mm256_loadu_si256((const __m256i *)(x + i + 96)))));
    *done = i;
    return _mm256_movemask_epi8(any) == 0;
}

static int no_top_bit(const int8_t *x, size_t n) {
    uint64_t any = 0;
    size_t i = 0;
    if (ql_isa_best() >= QL_ISA_AVX2 && !no_top_bit_avx2(x, n, &i)) return 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, x + i, 8);
        any |= w;
    }
    for (; i < n; i++) any |= (uint8_t)x[i];
    return (any & 0x8080808080808080ull) == 0;
}

__attribute__((target("avx2"))) static int contains_minus_128_avx2(const int8_t *x, size_t n, size_t *done) {
    const __m256i m128 = _mm256_set1_epi8(-128);
    __m256i any = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(x + i)), m128));
    *done = i;
    return _mm256_movemask_epi8(any) != 0;
}

/* Whether a weight is -128 (the signed kernels, here and in igemm.c, cannot negate it); the
 * packed weights of every call on signed codes are scanned, so vectorised where it can be. */
int ql_contains_minus_128(const int8_t *x, size_t n) {
    size_t i = 0;
    if (ql_isa_best() >= QL_ISA_AVX2 && contains_minus_128_avx2(x, n, &i)) return 1;
    int found = 0;
    for (; i < n; i++) found |= x[i] == -128;
    return found;
}

static int iconv_run(ql_isa isa, const ql_conv_geom *g, const int8_t *x, const void *packed,
                     const ql_requant_params *ep, int to_s8, void *out) {
    int OH, OW;
    if (!g || !x || !packed || !ep || !ep->scale || !out || ql_conv_out_size(g, &OH, &OW) != QL_OK) return QL_EINVAL;
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    if (g->groups != 1 || g->C % 4 != 0 || g->KH * g->KW > 64) return QL_EUNSUPPORTED;
    int depth = g->KH * g->KW * g->C;
    if (depth > 65536) return QL_EINVAL; /* the int32 bound of the GEMM's contract */
    dk_fn kernel = dk_avx2_u7, kernel16 = dk_avx2_u7_16, kernel8 = dk_avx2_u7_8;
    if (!no_top_bit(x, (size_t)g->N * g->H * g->W * g->C)) {
        if (ql_contains_minus_128((const int8_t *)packed, ql_igemm_packed_size(depth, g->K))) return QL_EUNSUPPORTED;
        kernel = dk_avx2_s7, kernel16 = dk_avx2_s7_16, kernel8 = dk_avx2_s7_8;
    }
    if (level == QL_ISA_REF) kernel = kernel16 = kernel8 = dk_ref;
    int M = g->N * OH * OW;
    if (M == 0 || g->K == 0) return QL_OK;
    iconv_job j = {g, OH, OW, M, (g->K + NRI - 1) / NRI, g->KH * g->KW, g->C / 4, level, to_s8, 0, 0, kernel, kernel16, kernel8,
                   x, (const int8_t *)packed, ep, out, QL_OK};
    int threads = ql_get_num_threads();
    double ops = 2.0 * M * g->K * (double)depth;
    int tasks = (threads <= 1 || ops < 4e6) ? 1 : threads;
    /* split the pixels unless there are too few of them to give each thread a few blocks */
    j.split_n = tasks > 1 && M < 2 * MB * tasks && j.panels >= tasks;
    int extent = j.split_n ? j.panels : M, align = j.split_n ? 1 : 2;
    j.chunk = ((extent + tasks - 1) / tasks + align - 1) / align * align;
    tasks = (extent + j.chunk - 1) / j.chunk;
    ql_parallel_for(tasks, iconv_task, &j);
    return atomic_load(&j.status);
}

int ql_iconv_nhwc_s8_isa(ql_isa isa, const ql_conv_geom *g, const int8_t *x, const void *packed,
                         const ql_requant_params *ep, int8_t *out) {
    return iconv_run(isa, g, x, packed, ep, 1, out);
}

int ql_iconv_nhwc_f32_isa(ql_isa isa, const ql_conv_geom *g, const int8_t *x, const void *packed,
                          const ql_requant_params *ep, float *out) {
    return iconv_run(isa, g, x, packed, ep, 0, out);
}
