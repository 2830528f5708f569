/* INT8 GEMM u8 x s8 -> s32 and the requantization epilogue (contract in ckernels.h).
 *
 * Packed weight layout (shared by every CPU version, so weights are packed once):
 *   K is padded to Kp = multiple of 4, N to multiple of 32, with zeros.
 *   Panel p covers columns [32p, 32p+32); inside it, k-group q (k = 4q..4q+3) is 128 bytes:
 *   byte (c*4 + r) = B[4q + r, 32p + c]. Offset of (p, q) = (p * Kp/4 + q) * 128.
 * This is the operand order of AVX-512 VNNI `vpdpbusd`, which adds to each int32 lane the
 * four products of 4 unsigned bytes of A with 4 signed bytes of B. Its products are exact and
 * its sums are exact int32 (no intermediate saturation), unlike AVX2 `vpmaddubsw`, whose
 * s16 pair sums saturate for u8*s8 inputs (2*255*127 > 32767). The AVX2 path therefore
 * sign-extends to s16 and uses `vpmaddwd` (s16 x s16 -> s32 pair sums), which is exact, at
 * half the bytes per instruction.
 *
 * The saturation cannot happen when every byte of A is at most 127: then |a1*b1 + a2*b2| <=
 * 2*127*128 = 32512 < 32767 for any s8 B. That holds for activations quantized symmetrically
 * after a ReLU (u8 codes 0..127), the common case in a RepVGG/YOLOv6 network. Packing A
 * records whether its bytes all fit; if they do, AVX2 uses `vpmaddubsw` (u8 x s8 pair sums in
 * s16) and `vpmaddwd` by ones (pairs of those into s32): exact, and twice the work of the
 * sign-extend path per instruction. Otherwise it takes the sign-extend path. Same results
 * either way, bit for bit.
 *
 * A is packed per call into MR-row panels of int32 words (4 k-bytes each), zero-padded. */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include "internal.h"

#define NRI 32
#define MRI 12
#define KCI 1024 /* k-bytes per slab: the A panel (12 KiB) and B panel (32 KiB) stay in L1/L2 */
#define MCI 240

static int kpad(int K) { return (K + 3) & ~3; }

size_t ql_igemm_packed_size(int K, int N) {
    if (K < 0 || N < 0) return 0;
    return (size_t)kpad(K) * (size_t)((N + NRI - 1) / NRI * NRI);
}

int ql_igemm_pack_b(void *restrict packed, int32_t *restrict col_sum, const int8_t *restrict B,
                    int ldb, int K, int N) {
    if (K < 0 || N < 0 || ldb < ql_max_i(N, 1)) return QL_EINVAL;
    int8_t *dst = (int8_t *)packed;
    int Kq = kpad(K) / 4, panels = (N + NRI - 1) / NRI;
    memset(dst, 0, ql_igemm_packed_size(K, N));
    for (int p = 0; p < panels; p++)
        for (int q = 0; q < Kq; q++) {
            int8_t *blk = dst + ((size_t)p * Kq + q) * 128;
            for (int c = 0; c < NRI; c++) {
                int n = p * NRI + c;
                if (n >= N) break;
                for (int r = 0; r < 4; r++) {
                    int k = 4 * q + r;
                    if (k < K) blk[c * 4 + r] = B[(size_t)k * ldb + n];
                }
            }
        }
    if (col_sum)
        for (int n = 0; n < N; n++) {
            int32_t s = 0;
            for (int k = 0; k < K; k++) s += B[(size_t)k * ldb + n];
            col_sum[n] = s;
        }
    return QL_OK;
}

int ql_igemm_u8s8s32_ref(int M, int N, int K, const uint8_t *A, int lda, const int8_t *B, int ldb,
                         int32_t *C, int ldc) {
    if (M < 0 || N < 0 || K < 0 || lda < ql_max_i(K, 1) || ldb < ql_max_i(N, 1) ||
        ldc < ql_max_i(N, 1))
        return QL_EINVAL;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            int32_t acc = 0;
            for (int k = 0; k < K; k++) acc += (int32_t)A[(size_t)i * lda + k] * (int32_t)B[(size_t)k * ldb + j];
            C[(size_t)i * ldc + j] = acc;
        }
    return QL_OK;
}

/* Ap[panel][q][r] = 4 bytes A[i0 + panel*MRI + r, k0 + 4q .. +3] as one int32 word, zero
 * past K and past the last row. Returns the OR of all packed bytes: bit 7 clear means every
 * byte is at most 127. Whole words are one 4-byte copy each (a byte loop here was a sixth of
 * the engine's INT8 time before the direct conv, and still most of an attention product's
 * packing, whose K, the number of keys, is rarely a multiple of 4); only a last partial word
 * goes byte by byte. */
static uint8_t pack_a_u8(int32_t *restrict Ap, const uint8_t *A, int lda, int i0, int mc, int k0,
                         int kc, int K) {
    int kq = (kc + 3) / 4, kv = ql_min_i(kc, K - k0); /* bytes of each row that exist */
    int whole = kv / 4;
    uint32_t seen = 0;
    for (int p = 0; p < mc; p += MRI) {
        int rows = ql_min_i(MRI, mc - p);
        int32_t *dst = Ap + (size_t)p * kq;
        for (int r = 0; r < MRI; r++) {
            if (r >= rows) {
                for (int q = 0; q < kq; q++) dst[(size_t)q * MRI + r] = 0;
                continue;
            }
            const uint8_t *src = A + (size_t)(i0 + p + r) * lda + k0;
            int q = 0;
            for (; q < whole; q++) {
                uint32_t w;
                memcpy(&w, src + 4 * q, 4);
                seen |= w;
                dst[(size_t)q * MRI + r] = (int32_t)w;
            }
            for (; q < kq; q++) {
                uint8_t b[4] = {0, 0, 0, 0};
                for (int t = 0; t < 4; t++)
                    if (4 * q + t < kv) b[t] = src[4 * q + t];
                uint32_t w;
                memcpy(&w, b, 4);
                seen |= w;
                dst[(size_t)q * MRI + r] = (int32_t)w;
            }
        }
    }
    return (uint8_t)(seen | seen >> 8 | seen >> 16 | seen >> 24);
}

/* Tile (mr x nr) of C: C = acc (first slab) or C += acc. */
static inline void store_tile_i32(int32_t *C, int ldc, const int32_t *tile, int mr, int nr,
                                  int accumulate) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            int32_t *c = &C[(size_t)i * ldc + j];
            *c = accumulate ? *c + tile[i * NRI + j] : tile[i * NRI + j];
        }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void
ukr_vnni(int kq, const int32_t *restrict a, const int8_t *restrict b, int32_t *C, int ldc,
         int accumulate, int mr, int nr) {
    __m512i c[MRI][2];
    for (int i = 0; i < MRI; i++) c[i][0] = c[i][1] = _mm512_setzero_si512();
    for (int q = 0; q < kq; q++) {
        __m512i b0 = _mm512_loadu_si512((const void *)b), b1 = _mm512_loadu_si512((const void *)(b + 64));
        _mm_prefetch((const char *)(b + 8 * 128), _MM_HINT_T0);
#pragma clang loop unroll(full)
        for (int i = 0; i < MRI; i++) {
            __m512i ai = _mm512_set1_epi32(a[i]);
            c[i][0] = _mm512_dpbusd_epi32(c[i][0], ai, b0);
            c[i][1] = _mm512_dpbusd_epi32(c[i][1], ai, b1);
        }
        a += MRI;
        b += 128;
    }
    if (mr == MRI && nr == NRI) {
        for (int i = 0; i < MRI; i++) {
            int32_t *ci = C + (size_t)i * ldc;
            __m512i v0 = c[i][0], v1 = c[i][1];
            if (accumulate) {
                v0 = _mm512_add_epi32(v0, _mm512_loadu_si512((const void *)ci));
                v1 = _mm512_add_epi32(v1, _mm512_loadu_si512((const void *)(ci + 16)));
            }
            _mm512_storeu_si512((void *)ci, v0);
            _mm512_storeu_si512((void *)(ci + 16), v1);
        }
        return;
    }
    int32_t tile[MRI * NRI] __attribute__((aligned(64)));
    for (int i = 0; i < MRI; i++) {
        _mm512_store_si512((void *)(tile + i * NRI), c[i][0]);
        _mm512_store_si512((void *)(tile + i * NRI + 16), c[i][1]);
    }
    store_tile_i32(C, ldc, tile, mr, nr, accumulate);
}

/* AVX2: 4 rows x 32 columns per call, processed as four 8-column strips. For one k-group, the
 * 32 bytes of 8 columns (4 k each) are sign-extended to two vectors of 16 s16
 * [c0k0 c0k1 c0k2 c0k3 c1k0 ...]; A's 4 bytes are zero-extended and repeated; vpmaddwd gives
 * int32 pair sums [c0(k0,k1) c0(k2,k3) c1(k0,k1) ...], added up over q; the two halves of
 * each column are added at the end. */
#define MRA 4
__attribute__((target("avx2,fma"))) static void ukr_avx2_i8(int kq, const int32_t *restrict a,
                                                            const int8_t *restrict b, int32_t *C,
                                                            int ldc, int accumulate, int mr,
                                                            int nr) {
    int32_t tile[MRI * NRI] __attribute__((aligned(32)));
    for (int r0 = 0; r0 < mr; r0 += MRA) {
        for (int s = 0; s < 4; s++) { /* 8-column strip */
            __m256i acc[MRA][2];
            for (int i = 0; i < MRA; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
            const int8_t *bq = b + s * 32;
            const int32_t *aq = a + r0;
            for (int q = 0; q < kq; q++) {
                __m128i raw = _mm_loadu_si128((const __m128i *)bq);       /* cols 0-3 */
                __m128i raw2 = _mm_loadu_si128((const __m128i *)(bq + 16)); /* cols 4-7 */
                __m256i w0 = _mm256_cvtepi8_epi16(raw), w1 = _mm256_cvtepi8_epi16(raw2);
#pragma clang loop unroll(full)
                for (int i = 0; i < MRA; i++) {
                    __m128i a4 = _mm_cvtsi32_si128(aq[i]);
                    __m256i av = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(a4));
                    acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(av, w0));
                    acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(av, w1));
                }
                aq += MRI;
                bq += 128;
            }
            for (int i = 0; i < MRA && r0 + i < MRI; i++) {
                /* hadd pairs: lanes (2c, 2c+1) -> column c; hadd interleaves 128-bit halves */
                __m256i h = _mm256_hadd_epi32(acc[i][0], acc[i][1]);
                h = _mm256_permute4x64_epi64(h, 0xD8);
                _mm256_store_si256((__m256i *)(tile + (r0 + i) * NRI + s * 8), h);
            }
        }
    }
    store_tile_i32(C, ldc, tile, mr, nr, accumulate);
}

/* AVX2 when every byte of A is at most 127: two rows x 32 columns per pass, all four 8-column
 * strips of B held in registers. For one k-group, A's 4 bytes are broadcast to every 32-bit
 * lane; vpmaddubsw with the strip (8 columns x 4 k, the packed order) gives s16 pair sums
 * [c0(k0,k1) c0(k2,k3) c1(k0,k1) ...] (no saturation: see the top of this file), and vpmaddwd
 * by ones adds each column's two pairs into its own int32 lane: lane c of strip s is column
 * 8s + c, so no reordering is needed at the end. 8 accumulators + 4 B + A + ones + 1 temp =
 * 15 of the 16 ymm registers. */
__attribute__((target("avx2,fma"), always_inline)) static inline void ukr_avx2_pairs(int kq, const int32_t *restrict a,
                                                                                   const int8_t *restrict b, int32_t *C, int ldc,
                                                                                   int accumulate, int mr, int nr, const int signed_a) {
    int32_t tile[2 * NRI] __attribute__((aligned(32)));
    for (int r0 = 0; r0 < mr; r0 += 2) {
        __m256i c0[4], c1[4];
        for (int s = 0; s < 4; s++) c0[s] = c1[s] = _mm256_setzero_si256();
        const int8_t *bq = b;
        const int32_t *aq = a + r0;
        for (int q = 0; q < kq; q++) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)bq), b1 = _mm256_loadu_si256((const __m256i *)(bq + 32));
            __m256i b2 = _mm256_loadu_si256((const __m256i *)(bq + 64)), b3 = _mm256_loadu_si256((const __m256i *)(bq + 96));
            __m256i a0 = _mm256_set1_epi32(aq[0]), a1 = _mm256_set1_epi32(aq[1]);
            c0[0] = _mm256_add_epi32(c0[0], ql_dot4_u8s8(a0, b0, signed_a));
            c0[1] = _mm256_add_epi32(c0[1], ql_dot4_u8s8(a0, b1, signed_a));
            c0[2] = _mm256_add_epi32(c0[2], ql_dot4_u8s8(a0, b2, signed_a));
            c0[3] = _mm256_add_epi32(c0[3], ql_dot4_u8s8(a0, b3, signed_a));
            c1[0] = _mm256_add_epi32(c1[0], ql_dot4_u8s8(a1, b0, signed_a));
            c1[1] = _mm256_add_epi32(c1[1], ql_dot4_u8s8(a1, b1, signed_a));
            c1[2] = _mm256_add_epi32(c1[2], ql_dot4_u8s8(a1, b2, signed_a));
            c1[3] = _mm256_add_epi32(c1[3], ql_dot4_u8s8(a1, b3, signed_a));
            aq += MRI;
            bq += 128;
        }
        int rows = ql_min_i(2, mr - r0);
        if (nr == NRI) {
            for (int i = 0; i < rows; i++) {
                int32_t *ci = C + (size_t)(r0 + i) * ldc;
                const __m256i *acc = i == 0 ? c0 : c1;
                for (int s = 0; s < 4; s++) {
                    __m256i v = acc[s];
                    if (accumulate) v = _mm256_add_epi32(v, _mm256_loadu_si256((const __m256i *)(ci + 8 * s)));
                    _mm256_storeu_si256((__m256i *)(ci + 8 * s), v);
                }
            }
        } else {
            for (int s = 0; s < 4; s++) {
                _mm256_store_si256((__m256i *)(tile + 8 * s), c0[s]);
                _mm256_store_si256((__m256i *)(tile + NRI + 8 * s), c1[s]);
            }
            store_tile_i32(C + (size_t)r0 * ldc, ldc, tile, rows, nr, accumulate);
        }
    }
}

__attribute__((target("avx2,fma"))) static void ukr_avx2_u7(int kq, const int32_t *restrict a, const int8_t *restrict b,
                                                            int32_t *C, int ldc, int accumulate, int mr, int nr) {
    ukr_avx2_pairs(kq, a, b, C, ldc, accumulate, mr, nr, 0);
}

/* A's bytes are signed codes and B has no -128 (ql_dot4_u8s8's signed form): exact as
 * ukr_avx2_u7, two more instructions per 32 products; the engine's linear and attention
 * products, whose codes are signed, no longer go through the sign-extending kernel. */
__attribute__((target("avx2,fma"))) static void ukr_avx2_s7(int kq, const int32_t *restrict a, const int8_t *restrict b,
                                                            int32_t *C, int ldc, int accumulate, int mr, int nr) {
    ukr_avx2_pairs(kq, a, b, C, ldc, accumulate, mr, nr, 1);
}

typedef void (*ukr_i8_fn)(int, const int32_t *, const int8_t *, int32_t *, int, int, int, int);

static _Thread_local ql_scratch tl_apack, tl_cblock;

/* What to do with each finished block of int32 accumulators. */
typedef enum { OUT_S32 = 0, OUT_S8 = 1, OUT_F32 = 2 } out_kind;

typedef struct {
    int isa, M, N, K, lda, split_n, chunk;
    int a_signed; /* A holds signed codes (ql_igemm_s8s8_f32) */
    const uint8_t *A;
    const int8_t *packed;
    out_kind kind;
    void *out; /* int32_t*, int8_t* or float* */
    int ldo;
    const ql_requant_params *ep;
    _Atomic int status;
} igemm_job;

static int dequantize_f32_level(int level, int M, int N, float *out, int ldo, const int32_t *acc, int ldacc,
                                const int32_t *col_offset, const float *scale, const float *bias, int relu);

int ql_epilogue_block(int isa, int to_s8, void *out, int ldo, int m0, int n0, int rows, int ncols,
                      const int32_t *acc, int ldacc, const ql_requant_params *ep) {
    const int32_t *off = ep->col_offset ? ep->col_offset + n0 : NULL;
    const float *bias = ep->bias ? ep->bias + n0 : NULL;
    if (to_s8)
        return ql_requantize_s8_isa((ql_isa)isa, rows, ncols, (int8_t *)out + (size_t)m0 * ldo + n0, ldo, acc, ldacc,
                                    off, ep->scale + n0, bias, ep->relu);
    return dequantize_f32_level(isa, rows, ncols, (float *)out + (size_t)m0 * ldo + n0, ldo, acc, ldacc, off,
                                ep->scale + n0, bias, ep->relu);
}

/* Rows [m0, m0+M) x columns [n0, n0+N) of the product (n0 a multiple of NRI). Loop order:
 * MC row blocks outermost, so that a block's int32 accumulators are finished over the whole
 * K (in KC slabs) and then requantized while they are still in cache. */
static int igemm_block(const igemm_job *j, int m0, int M, int n0, int N) {
    int vnni = j->isa == QL_ISA_AVX512;
    int K = j->K, Kq = kpad(K) / 4;
    size_t apack = (size_t)((ql_min_i(MCI, M) + MRI - 1) / MRI * MRI) * (KCI / 4);
    int32_t *apack_buf = (int32_t *)ql_scratch_reserve(&tl_apack, apack * sizeof(int32_t));
    if (!apack_buf) return QL_ENOMEM;
    int32_t *C;
    int ldc;
    if (j->kind == OUT_S32) {
        C = (int32_t *)j->out + (size_t)m0 * j->ldo + n0;
        ldc = j->ldo;
    } else {
        C = (int32_t *)ql_scratch_reserve(&tl_cblock, (size_t)ql_min_i(MCI, M) * N * sizeof(int32_t));
        if (!C) return QL_ENOMEM;
        ldc = N;
    }
    for (int ic = 0; ic < M; ic += MCI) {
        int mc = ql_min_i(MCI, M - ic);
        int32_t *Cb = j->kind == OUT_S32 ? C + (size_t)ic * ldc : C;
        if (K == 0)
            for (int i = 0; i < mc; i++) memset(Cb + (size_t)i * ldc, 0, sizeof(int32_t) * (size_t)N);
        for (int pc = 0; pc < K; pc += KCI) {
            int kc = ql_min_i(KCI, K - pc), kq = (kc + 3) / 4;
            uint8_t any = pack_a_u8(apack_buf, j->A + (size_t)m0 * j->lda, j->lda, ic, mc, pc, kc, K);
            ukr_i8_fn ukr = j->a_signed ? ukr_avx2_s7 : vnni ? ukr_vnni : (any & 0x80) ? ukr_avx2_i8 : ukr_avx2_u7;
            for (int jr = 0; jr < N; jr += NRI) {
                int nr = ql_min_i(NRI, N - jr);
                const int8_t *bp = j->packed + ((size_t)((n0 + jr) / NRI) * Kq + pc / 4) * 128;
                for (int ir = 0; ir < mc; ir += MRI)
                    ukr(kq, apack_buf + (size_t)ir * kq, bp, Cb + (size_t)ir * ldc + jr, ldc, pc > 0,
                        ql_min_i(MRI, mc - ir), nr);
            }
        }
        if (j->kind != OUT_S32) ql_epilogue_block(j->isa, j->kind == OUT_S8, j->out, j->ldo, m0 + ic, n0, mc, N, Cb, ldc, j->ep);
    }
    return QL_OK;
}

static void igemm_task(int t, void *p) {
    igemm_job *j = (igemm_job *)p;
    int lo = t * j->chunk, st;
    if (j->split_n) {
        int n = ql_min_i(j->chunk, j->N - lo);
        if (n <= 0) return;
        st = igemm_block(j, 0, j->M, lo, n);
    } else {
        int m = ql_min_i(j->chunk, j->M - lo);
        if (m <= 0) return;
        st = igemm_block(j, lo, m, 0, j->N);
    }
    if (st) atomic_store(&j->status, st);
}

static int igemm_run_signed(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                            out_kind kind, void *out, int ldo, const ql_requant_params *ep, int a_signed) {
    if (M < 0 || N < 0 || K < 0 || lda < ql_max_i(K, 1) || ldo < ql_max_i(N, 1) || !packed || !out) return QL_EINVAL;
    if (kind != OUT_S32 && (!ep || !ep->scale)) return QL_EINVAL;
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    /* signed codes take the AVX2 |a| * sign(b, a) kernel on every SIMD level (VNNI's vpdpbusd
     * wants unsigned A), and need B without -128 (refused on every level alike) */
    if (a_signed && ql_contains_minus_128((const int8_t *)packed, ql_igemm_packed_size(K, N))) return QL_EUNSUPPORTED;
    if (M == 0 || N == 0) return QL_OK;
    if (level == QL_ISA_REF) {
        /* the reference on the packed operand: read B back through the documented layout */
        int32_t *C = kind == OUT_S32 ? (int32_t *)out : (int32_t *)ql_aligned_alloc((size_t)M * N * sizeof(int32_t));
        int ldc = kind == OUT_S32 ? ldo : N;
        if (!C) return QL_ENOMEM;
        const int8_t *bp = (const int8_t *)packed;
        int Kq = kpad(K) / 4;
        for (int i = 0; i < M; i++)
            for (int n = 0; n < N; n++) {
                int32_t acc = 0;
                for (int k = 0; k < K; k++)
                    acc += (a_signed ? (int32_t)(int8_t)A[(size_t)i * lda + k] : (int32_t)A[(size_t)i * lda + k]) *
                           (int32_t)bp[((size_t)(n / NRI) * Kq + k / 4) * 128 + (n % NRI) * 4 + k % 4];
                C[(size_t)i * ldc + n] = acc;
            }
        int st = QL_OK;
        if (kind == OUT_S8) st = ql_requantize_s8_ref(M, N, (int8_t *)out, ldo, C, ldc, ep->col_offset, ep->scale, ep->bias, ep->relu);
        if (kind == OUT_F32) st = ql_dequantize_f32_ref(M, N, (float *)out, ldo, C, ldc, ep->col_offset, ep->scale, ep->bias, ep->relu);
        if (kind != OUT_S32) ql_aligned_free(C);
        return st;
    }
    igemm_job j = {level, M, N, K, lda, 0, 0, a_signed, A, (const int8_t *)packed, kind, out, ldo, ep, QL_OK};
    int threads = ql_get_num_threads();
    double ops = 2.0 * M * N * (double)K;
    j.split_n = N > M;
    int align = j.split_n ? NRI : MRI, extent = j.split_n ? N : M;
    int tasks = (threads <= 1 || ops < 4e6) ? 1 : ql_min_i(threads, (extent + align - 1) / align);
    j.chunk = ((extent + tasks - 1) / tasks + align - 1) / align * align;
    tasks = (extent + j.chunk - 1) / j.chunk;
    ql_parallel_for(tasks, igemm_task, &j);
    return atomic_load(&j.status);
}

static int igemm_run(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     out_kind kind, void *out, int ldo, const ql_requant_params *ep) {
    return igemm_run_signed(isa, M, N, K, A, lda, packed, kind, out, ldo, ep, 0);
}

int ql_igemm_s8s8_f32_isa(ql_isa isa, int M, int N, int K, const int8_t *A, int lda, const void *packed,
                          const ql_requant_params *ep, float *out, int ldo) {
    return igemm_run_signed(isa, M, N, K, (const uint8_t *)A, lda, packed, OUT_F32, out, ldo, ep, 1);
}

int ql_igemm_s8s8_f32(int M, int N, int K, const int8_t *A, int lda, const void *packed,
                      const ql_requant_params *ep, float *out, int ldo) {
    return ql_igemm_s8s8_f32_isa(QL_ISA_BEST, M, N, K, A, lda, packed, ep, out, ldo);
}

int ql_igemm_u8s8s32_isa(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda,
                         const void *packed, int32_t *C, int ldc) {
    return igemm_run(isa, M, N, K, A, lda, packed, OUT_S32, C, ldc, NULL);
}

int ql_igemm_u8s8_s8_isa(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                         const ql_requant_params *ep, int8_t *out, int ldo) {
    return igemm_run(isa, M, N, K, A, lda, packed, OUT_S8, out, ldo, ep);
}

int ql_igemm_u8s8_s8(int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     const ql_requant_params *ep, int8_t *out, int ldo) {
    return igemm_run(QL_ISA_BEST, M, N, K, A, lda, packed, OUT_S8, out, ldo, ep);
}

int ql_igemm_u8s8_f32_isa(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                          const ql_requant_params *ep, float *out, int ldo) {
    return igemm_run(isa, M, N, K, A, lda, packed, OUT_F32, out, ldo, ep);
}

int ql_igemm_u8s8_f32(int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                      const ql_requant_params *ep, float *out, int ldo) {
    return igemm_run(QL_ISA_BEST, M, N, K, A, lda, packed, OUT_F32, out, ldo, ep);
}

int ql_igemm_u8s8s32(int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     int32_t *C, int ldc) {
    return ql_igemm_u8s8s32_isa(QL_ISA_BEST, M, N, K, A, lda, packed, C, ldc);
}

/* ---------------------------------------------------------------------------------------- */
/* Epilogue                                                                                  */
/* ---------------------------------------------------------------------------------------- */
static int check_epilogue(int M, int N, int ldo, int ldacc, const float *scale) {
    if (M < 0 || N < 0 || ldo < ql_max_i(N, 1) || ldacc < ql_max_i(N, 1) || !scale) return QL_EINVAL;
    return QL_OK;
}

/* `relu` is the activation: 0 none, 1 ReLU, 2 SiLU (v * sigmoid(v), as the elementwise op). */
static inline float epilogue_value(int32_t acc, int32_t off, float scale, float bias, int relu) {
    float v = fmaf((float)(acc + off), scale, bias);
    if (relu == 2) return v * sigmoidf_stable(v);
    return relu && v < 0.0f ? 0.0f : v;
}

int ql_requantize_s8_ref(int M, int N, int8_t *restrict out, int ldo, const int32_t *restrict acc,
                         int ldacc, const int32_t *col_offset, const float *scale,
                         const float *bias, int relu) {
    int st = check_epilogue(M, N, ldo, ldacc, scale);
    if (st) return st;
    for (int i = 0; i < M; i++)
        for (int n = 0; n < N; n++) {
            float v = epilogue_value(acc[(size_t)i * ldacc + n], col_offset ? col_offset[n] : 0,
                                     scale[n], bias ? bias[n] : 0.0f, relu);
            float r = nearbyintf(v); /* default rounding mode: half to even */
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            out[(size_t)i * ldo + n] = (int8_t)r;
        }
    return QL_OK;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void
requant_avx512(int M, int N, int8_t *out, int ldo, const int32_t *acc, int ldacc,
               const int32_t *col_offset, const float *scale, const float *bias, int relu) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int i = 0; i < M; i++) {
        const int32_t *a = acc + (size_t)i * ldacc;
        int8_t *o = out + (size_t)i * ldo;
        for (int n = 0; n < N; n += 16) {
            __mmask16 m = n + 16 <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
            __m512i v = _mm512_maskz_loadu_epi32(m, a + n);
            if (col_offset) v = _mm512_add_epi32(v, _mm512_maskz_loadu_epi32(m, col_offset + n));
            __m512 f = _mm512_cvtepi32_ps(v);
            __m512 s = _mm512_maskz_loadu_ps(m, scale + n);
            __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
            f = _mm512_fmadd_ps(f, s, b);
            if (relu) f = _mm512_max_ps(f, _mm512_setzero_ps());
            __m512i q = _mm512_cvtps_epi32(f); /* MXCSR default: round half to even */
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            _mm512_mask_cvtepi32_storeu_epi8(o + n, m, q);
        }
    }
}

/* epilogue_value's v for 8 columns from n: fmaf(acc + offset, scale, bias), then the activation
 * (ReLU as the scalar writes it, v < 0 ? 0 : v, which keeps a -0 or a NaN as it is) */
__attribute__((target("avx2,fma"))) static inline __m256 epilogue8(const int32_t *a, const int32_t *col_offset,
                                                                   const float *scale, const float *bias, int n, int relu) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(a + n));
    if (col_offset) v = _mm256_add_epi32(v, _mm256_loadu_si256((const __m256i *)(col_offset + n)));
    __m256 b = bias ? _mm256_loadu_ps(bias + n) : _mm256_setzero_ps();
    __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(scale + n), b);
    if (relu == 2) return _mm256_mul_ps(f, ql_sigmoid8(f)); /* SiLU: v * sigmoid(v) */
    return relu ? _mm256_andnot_ps(_mm256_cmp_ps(f, _mm256_setzero_ps(), _CMP_LT_OQ), f) : f;
}

/* epilogue8 for the last count < 8 columns from n, through 8-wide copies (zero past count; an
 * absent offset or bias is the 0 it stands for), so they get the same instructions as the rest:
 * the scalar reference's fmaf is a call into libm where the C file is not built for FMA. */
__attribute__((target("avx2,fma"))) static inline __m256 epilogue8_tail(const int32_t *a, const int32_t *col_offset,
                                                                        const float *scale, const float *bias, int n, int count,
                                                                        int relu) {
    int32_t ta[8] = {0}, to[8] = {0};
    float ts[8] = {0}, tb[8] = {0};
    for (int i = 0; i < count; i++) {
        ta[i] = a[n + i];
        to[i] = col_offset ? col_offset[n + i] : 0;
        ts[i] = scale[n + i];
        tb[i] = bias ? bias[n + i] : 0.0f;
    }
    return epilogue8(ta, to, ts, tb, 0, relu);
}

__attribute__((target("avx2,fma"))) static void
requant_avx2(int M, int N, int8_t *out, int ldo, const int32_t *acc, int ldacc,
             const int32_t *col_offset, const float *scale, const float *bias, int relu) {
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    int N8 = N & ~7;
    for (int i = 0; i < M; i++) {
        const int32_t *a = acc + (size_t)i * ldacc;
        int8_t *o = out + (size_t)i * ldo;
        for (int n = 0; n < N; n += 8) {
            __m256 f = n < N8 ? epilogue8(a, col_offset, scale, bias, n, relu) : epilogue8_tail(a, col_offset, scale, bias, n, N - n, relu);
            __m256i q = _mm256_cvtps_epi32(f);
            q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
            /* to 8 bytes: already within [-127, 127], so the saturating packs change nothing */
            __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            w = _mm_packs_epi16(w, w);
            if (n < N8) _mm_storel_epi64((__m128i *)(o + n), w);
            else {
                int8_t t[16];
                _mm_storeu_si128((__m128i *)t, w);
                memcpy(o + n, t, (size_t)(N - n));
            }
        }
    }
}

int ql_requantize_s8_isa(ql_isa isa, int M, int N, int8_t *restrict out, int ldo,
                         const int32_t *restrict acc, int ldacc, const int32_t *col_offset,
                         const float *scale, const float *bias, int relu) {
    int st = check_epilogue(M, N, ldo, ldacc, scale);
    if (st) return st;
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    /* SiLU: the AVX2 loop on AVX-512 machines too (ql_sigmoid8 is the one vector logistic) */
    if (level == QL_ISA_AVX512 && relu != 2) requant_avx512(M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
    else if (level >= QL_ISA_AVX2) requant_avx2(M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
    else return ql_requantize_s8_ref(M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
    return QL_OK;
}

int ql_requantize_s8(int M, int N, int8_t *restrict out, int ldo, const int32_t *restrict acc,
                     int ldacc, const int32_t *col_offset, const float *scale, const float *bias,
                     int relu) {
    return ql_requantize_s8_isa(QL_ISA_BEST, M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
}

int ql_dequantize_f32_ref(int M, int N, float *restrict out, int ldo, const int32_t *restrict acc,
                          int ldacc, const int32_t *col_offset, const float *scale,
                          const float *bias, int relu) {
    int st = check_epilogue(M, N, ldo, ldacc, scale);
    if (st) return st;
    for (int i = 0; i < M; i++)
        for (int n = 0; n < N; n++)
            out[(size_t)i * ldo + n] = epilogue_value(acc[(size_t)i * ldacc + n],
                                                      col_offset ? col_offset[n] : 0, scale[n],
                                                      bias ? bias[n] : 0.0f, relu);
    return QL_OK;
}

/* The float epilogue 8 columns at a time (the last N % 8 through epilogue8_tail). */
__attribute__((target("avx2,fma"))) static void
dequant_avx2(int M, int N, float *out, int ldo, const int32_t *acc, int ldacc, const int32_t *col_offset,
             const float *scale, const float *bias, int relu) {
    int N8 = N & ~7;
    for (int i = 0; i < M; i++) {
        const int32_t *a = acc + (size_t)i * ldacc;
        float *o = out + (size_t)i * ldo;
        for (int n = 0; n < N8; n += 8) _mm256_storeu_ps(o + n, epilogue8(a, col_offset, scale, bias, n, relu));
        if (N8 < N) {
            float t[8];
            _mm256_storeu_ps(t, epilogue8_tail(a, col_offset, scale, bias, N8, N - N8, relu));
            memcpy(o + N8, t, sizeof(float) * (size_t)(N - N8));
        }
    }
}

static int dequantize_f32_level(int level, int M, int N, float *out, int ldo, const int32_t *acc, int ldacc,
                                const int32_t *col_offset, const float *scale, const float *bias, int relu) {
    if (level >= QL_ISA_AVX2) {
        int st = check_epilogue(M, N, ldo, ldacc, scale);
        if (st) return st;
        dequant_avx2(M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
        return QL_OK;
    }
    return ql_dequantize_f32_ref(M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
}

int ql_dequantize_f32(int M, int N, float *restrict out, int ldo, const int32_t *restrict acc,
                      int ldacc, const int32_t *col_offset, const float *scale, const float *bias,
                      int relu) {
    return dequantize_f32_level(ql_resolve_isa(QL_ISA_BEST), M, N, out, ldo, acc, ldacc, col_offset, scale, bias, relu);
}
