/* SGEMM: C = alpha * op(A) * op(B) + beta * C (contract in ckernels.h).
 *
 * Structure (Goto/BLIS): the K dimension is cut into KC-deep slabs and N into NC-wide
 * blocks; each B slab is packed into NR-wide column panels and each A block into MR-tall row
 * panels, both zero-padded, with alpha folded into A. A register-blocked micro-kernel then
 * computes one MR x NR tile of C over the KC slab with FMAs, keeping the whole tile in
 * registers:
 *   AVX-512: MR = 12, NR = 32 -> 24 zmm accumulators + 2 for B + 1 broadcast (of 32)
 *   AVX2:    MR = 6,  NR = 16 -> 12 ymm accumulators + 2 for B + 1 broadcast (of 16)
 * Threads split the output into independent column (or row) slices, each packed separately,
 * so no synchronisation happens inside a GEMM. */
#include <immintrin.h>
#include <string.h>
#include "internal.h"

/* Blocking, tuned on a 2-core Zen 4/5 VM (see README, "Benchmarks"): the KC x NR panel of B
 * (64 KiB) streams from L1/L2 while MR x KC of A (24 KiB) stays in L1. Override with -D. */
#ifndef KC
#define KC 512
#endif
#ifndef MC
#define MC 72
#endif
#ifndef NC
#define NC 3072
#endif

/* ---------------------------------------------------------------------------------------- */
/* Reference: the specification. Float accumulation in increasing k.                         */
/* ---------------------------------------------------------------------------------------- */
static int check_args(int transA, int transB, int M, int N, int K, int lda, int ldb, int ldc) {
    if (M < 0 || N < 0 || K < 0) return QL_EINVAL;
    if (ldc < ql_max_i(N, 1)) return QL_EINVAL;
    if (lda < ql_max_i(transA ? M : K, 1)) return QL_EINVAL;
    if (ldb < ql_max_i(transB ? K : N, 1)) return QL_EINVAL;
    return QL_OK;
}

int ql_sgemm_ref(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    int st = check_args(transA, transB, M, N, K, lda, ldb, ldc);
    if (st) return st;
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) {
                float a = transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = transB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = (beta == 0.0f) ? alpha * acc : alpha * acc + beta * *c;
        }
    }
    return QL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Packing                                                                                   */
/* ---------------------------------------------------------------------------------------- */
/* Ap[panel][k][r] = alpha * op(A)[i0 + panel*MR + r, k0 + k], zero beyond mc. */
static void pack_a(float *restrict Ap, int MR, int transA, const float *A, int lda, int i0, int mc,
                   int k0, int kc, float alpha) {
    for (int p = 0; p < mc; p += MR) {
        int rows = ql_min_i(MR, mc - p);
        float *dst = Ap + (size_t)p * kc;
        if (!transA) {
            /* k outer: contiguous writes, MR read streams (prefetch-friendly) */
            const float *src[16];
            for (int r = 0; r < rows; r++) src[r] = A + (size_t)(i0 + p + r) * lda + k0;
            for (int k = 0; k < kc; k++)
                for (int r = 0; r < rows; r++) dst[(size_t)k * MR + r] = alpha * src[r][k];
        } else {
            for (int k = 0; k < kc; k++) {
                const float *src = A + (size_t)(k0 + k) * lda + i0 + p;
                for (int r = 0; r < rows; r++) dst[(size_t)k * MR + r] = alpha * src[r];
            }
        }
        for (int r = rows; r < MR; r++)
            for (int k = 0; k < kc; k++) dst[(size_t)k * MR + r] = 0.0f;
    }
}

/* Bp[panel][k][c] = op(B)[k0 + k, j0 + panel*NR + c], zero beyond nc. */
static void pack_b(float *restrict Bp, int NR, int transB, const float *B, int ldb, int j0, int nc,
                   int k0, int kc) {
    for (int p = 0; p < nc; p += NR) {
        int cols = ql_min_i(NR, nc - p);
        float *dst = Bp + (size_t)p * kc;
        if (!transB) {
            for (int k = 0; k < kc; k++) {
                const float *src = B + (size_t)(k0 + k) * ldb + j0 + p;
                float *d = dst + (size_t)k * NR;
                memcpy(d, src, sizeof(float) * (size_t)cols);
                for (int c = cols; c < NR; c++) d[c] = 0.0f;
            }
        } else {
            /* transpose 8 k at a time: read 8 floats of each column, write 8 rows of the panel */
            int k = 0;
            for (; k + 8 <= kc; k += 8) {
                for (int c = 0; c < cols; c++) {
                    const float *src = B + (size_t)(j0 + p + c) * ldb + k0 + k;
                    for (int t = 0; t < 8; t++) dst[(size_t)(k + t) * NR + c] = src[t];
                }
            }
            for (; k < kc; k++)
                for (int c = 0; c < cols; c++) dst[(size_t)k * NR + c] = B[(size_t)(j0 + p + c) * ldb + k0 + k];
            for (int c = cols; c < NR; c++)
                for (int kk = 0; kk < kc; kk++) dst[(size_t)kk * NR + c] = 0.0f;
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Micro-kernels: tile = sum_k a[k][0..MR) x b[k][0..NR), then C = tile + beta*C.             */
/* Partial tiles (edges) go through a stack buffer.                                          */
/* ---------------------------------------------------------------------------------------- */
static inline void store_tile(float *C, int ldc, const float *tile, int ld_tile, int mr, int nr,
                              float beta) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *c = &C[(size_t)i * ldc + j];
            *c = (beta == 0.0f) ? tile[i * ld_tile + j] : tile[i * ld_tile + j] + beta * *c;
        }
}

#define MR512 12
#define NR512 32
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) static void
ukr_avx512(int kc, const float *restrict a, const float *restrict b, int bstep, float *C, int ldc, float beta,
           int mr, int nr) {
    __m512 c[MR512][2];
    for (int i = 0; i < MR512; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        _mm_prefetch((const char *)(b + 8 * bstep), _MM_HINT_T0);
#pragma clang loop unroll(full)
        for (int i = 0; i < MR512; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            c[i][0] = _mm512_fmadd_ps(ai, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(ai, b1, c[i][1]);
        }
        a += MR512;
        b += bstep;
    }
    if (mr == MR512 && nr == NR512) {
        __m512 vb = _mm512_set1_ps(beta);
        for (int i = 0; i < MR512; i++) {
            float *ci = C + (size_t)i * ldc;
            if (beta == 0.0f) {
                _mm512_storeu_ps(ci, c[i][0]);
                _mm512_storeu_ps(ci + 16, c[i][1]);
            } else {
                _mm512_storeu_ps(ci, _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci), c[i][0]));
                _mm512_storeu_ps(ci + 16, _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci + 16), c[i][1]));
            }
        }
    } else {
        float tile[MR512 * NR512] __attribute__((aligned(64)));
        for (int i = 0; i < MR512; i++) {
            _mm512_store_ps(tile + i * NR512, c[i][0]);
            _mm512_store_ps(tile + i * NR512 + 16, c[i][1]);
        }
        store_tile(C, ldc, tile, NR512, mr, nr, beta);
    }
}

#define MR256 6
#define NR256 16
__attribute__((target("avx2,fma"))) static void ukr_avx2(int kc, const float *restrict a,
                                                         const float *restrict b, int bstep, float *C,
                                                         int ldc, float beta, int mr, int nr) {
    __m256 c[MR256][2];
    for (int i = 0; i < MR256; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma clang loop unroll(full)
        for (int i = 0; i < MR256; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
        }
        a += MR256;
        b += bstep;
    }
    float tile[MR256 * NR256] __attribute__((aligned(32)));
    if (mr == MR256 && nr == NR256) {
        __m256 vb = _mm256_set1_ps(beta);
        for (int i = 0; i < MR256; i++) {
            float *ci = C + (size_t)i * ldc;
            if (beta == 0.0f) {
                _mm256_storeu_ps(ci, c[i][0]);
                _mm256_storeu_ps(ci + 8, c[i][1]);
            } else {
                _mm256_storeu_ps(ci, _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci), c[i][0]));
                _mm256_storeu_ps(ci + 8, _mm256_fmadd_ps(vb, _mm256_loadu_ps(ci + 8), c[i][1]));
            }
        }
        return;
    }
    for (int i = 0; i < MR256; i++) {
        _mm256_store_ps(tile + i * NR256, c[i][0]);
        _mm256_store_ps(tile + i * NR256 + 8, c[i][1]);
    }
    store_tile(C, ldc, tile, NR256, mr, nr, beta);
}

/* ---------------------------------------------------------------------------------------- */
/* Serial blocked driver                                                                     */
/* ---------------------------------------------------------------------------------------- */
typedef void (*ukr_fn)(int, const float *, const float *, int, float *, int, float, int, int);

/* Per-thread packing buffers, grown on demand and kept for the thread's lifetime. */
static _Thread_local ql_scratch tl_apack, tl_bpack;

static void scale_c(float *C, int ldc, int M, int N, float beta) {
    for (int i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)N);
        else for (int j = 0; j < N; j++) c[j] *= beta;
    }
}

/* The blocked loop. A comes either packed here per (ic, pc) block, or pre-packed by
 * ql_sgemm_pack_a (Apre != NULL: alpha is already folded in, transA and A are unused).
 * Returns QL_ENOMEM, with C untouched, when the packing scratch cannot be had. */
static int sgemm_blocked(int isa, int transA, int transB, int M, int N, int K, float alpha,
                         const float *A, int lda, const float *Apre, const float *B, int ldb,
                         float beta, float *C, int ldc, const ql_operand_packers *pk) {
    int MR = isa == QL_ISA_AVX512 ? MR512 : MR256;
    int NR = isa == QL_ISA_AVX512 ? NR512 : NR256;
    ukr_fn ukr = isa == QL_ISA_AVX512 ? ukr_avx512 : ukr_avx2;
    int ncmax = ql_min_i(NC, N), kcmax = ql_min_i(KC, K), mcmax = ql_min_i(MC, M);
    size_t mround = (size_t)(M + MR - 1) / MR * MR;
    size_t bneed = (size_t)((ncmax + NR - 1) / NR * NR) * kcmax;
    size_t aneed = Apre ? 1 : (size_t)((mcmax + MR - 1) / MR * MR) * kcmax;
    float *Bp = (float *)ql_scratch_reserve(&tl_bpack, bneed * sizeof(float));
    float *Ap = (float *)ql_scratch_reserve(&tl_apack, aneed * sizeof(float));
    if (!Ap || !Bp) return QL_ENOMEM;
    for (int jc = 0; jc < N; jc += NC) {
        int nc = ql_min_i(NC, N - jc);
        for (int pc = 0; pc < K; pc += KC) {
            int kc = ql_min_i(KC, K - pc);
            float beta_eff = pc == 0 ? beta : 1.0f;
            /* With few rows, a packed B panel would be read only once or twice: read full
             * panels of a row-major B in place (row stride ldb) and pack only the ragged one. */
            int direct = !transB && M <= 4 * MR && !(pk && pk->pack_b);
            int full = direct ? nc / NR * NR : 0;
            if (direct) {
                if (full < nc) pack_b(Bp + (size_t)full * kc, NR, transB, B, ldb, jc + full, nc - full, pc, kc);
            } else if (pk && pk->pack_b) {
                pk->pack_b(pk->ctx_b ? pk->ctx_b : pk->ctx, Bp, NR, jc, nc, pc, kc);
            } else {
                pack_b(Bp, NR, transB, B, ldb, jc, nc, pc, kc);
            }
            for (int ic = 0; ic < M; ic += MC) {
                int mc = ql_min_i(MC, M - ic);
                const float *a = Apre ? Apre + mround * pc + (size_t)ic * kc : Ap;
                if (!Apre) {
                    if (pk && pk->pack_a) pk->pack_a(pk->ctx, Ap, MR, ic, mc, pc, kc);
                    else pack_a(Ap, MR, transA, A, lda, ic, mc, pc, kc, alpha);
                }
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = ql_min_i(NR, nc - jr);
                    const float *bp = jr < full ? B + (size_t)pc * ldb + jc + jr : Bp + (size_t)jr * kc;
                    int bstep = jr < full ? ldb : NR;
                    for (int ir = 0; ir < mc; ir += MR) {
                        int mr = ql_min_i(MR, mc - ir);
                        ukr(kc, a + (size_t)ir * kc, bp, bstep, C + (size_t)(ic + ir) * ldc + jc + jr, ldc, beta_eff, mr, nr);
                    }
                }
            }
        }
    }
    return QL_OK;
}

void ql_sgemm_serial(int isa, int transA, int transB, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C,
                     int ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0 || alpha == 0.0f) {
        scale_c(C, ldc, M, N, beta);
        return;
    }
    if (isa == QL_ISA_REF) {
        ql_sgemm_ref(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    /* out of memory: fall back to the reference, never a wrong answer */
    if (sgemm_blocked(isa, transA, transB, M, N, K, alpha, A, lda, NULL, B, ldb, beta, C, ldc, NULL))
        ql_sgemm_ref(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* Pre-packed A: the panels sgemm_blocked packs per (ic, pc) block, all of them, laid out so
 * that block (ic, pc) starts at mround * pc + ic * kc (MC is a multiple of MR). */
static int packed_mr(int isa) { return isa == QL_ISA_AVX512 ? MR512 : MR256; }
int ql_sgemm_panel_width(int isa) { return isa == QL_ISA_AVX512 ? NR512 : NR256; }

size_t ql_sgemm_packed_a_floats(ql_isa isa, int M, int K) {
    int level = ql_resolve_isa(isa);
    if (level <= QL_ISA_REF || M <= 0 || K <= 0) return 0;
    int MR = packed_mr(level);
    return (size_t)(M + MR - 1) / MR * MR * (size_t)K;
}

int ql_sgemm_pack_a(ql_isa isa, int transA, int M, int K, float alpha, const float *A, int lda, float *Ap) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    if (level == QL_ISA_REF || M <= 0 || K <= 0 || lda < (transA ? M : K) || !A || !Ap) return QL_EINVAL;
    int MR = packed_mr(level);
    size_t mround = (size_t)(M + MR - 1) / MR * MR;
    for (int pc = 0; pc < K; pc += KC) pack_a(Ap + mround * pc, MR, transA, A, lda, 0, M, pc, ql_min_i(KC, K - pc), alpha);
    return QL_OK;
}

int ql_sgemm_packed_a_serial(ql_isa isa, int M, int N, int K, const float *Ap, int transB, const float *B,
                             int ldb, float beta, float *C, int ldc) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    if (level == QL_ISA_REF || M < 0 || N < 0 || K < 0 || ldc < ql_max_i(N, 1) || ldb < ql_max_i(transB ? K : N, 1))
        return QL_EINVAL;
    if (M == 0 || N == 0) return QL_OK;
    if (K == 0) {
        scale_c(C, ldc, M, N, beta);
        return QL_OK;
    }
    return sgemm_blocked(level, 0, transB, M, N, K, 1.0f, NULL, 0, Ap, B, ldb, beta, C, ldc, NULL);
}

int ql_sgemm_packers_serial(int isa, int M, int N, int K, const float *Ap, int transB, const float *B, int ldb,
                            const ql_operand_packers *pk, float beta, float *C, int ldc) {
    if (M == 0 || N == 0) return QL_OK;
    if (K == 0) {
        scale_c(C, ldc, M, N, beta);
        return QL_OK;
    }
    return sgemm_blocked(isa, 0, transB, M, N, K, 1.0f, NULL, 0, Ap, B, ldb, beta, C, ldc, pk);
}

/* ---------------------------------------------------------------------------------------- */
/* Parallel entry points                                                                     */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    int isa, transA, transB, M, N, K, lda, ldb, ldc, split_n, chunk;
    float alpha, beta;
    const float *A, *B;
    float *C;
} sgemm_job;

static void sgemm_task(int t, void *p) {
    const sgemm_job *j = (const sgemm_job *)p;
    int lo = t * j->chunk;
    if (j->split_n) {
        int n = ql_min_i(j->chunk, j->N - lo);
        if (n <= 0) return;
        const float *B = j->transB ? j->B + (size_t)lo * j->ldb : j->B + lo;
        ql_sgemm_serial(j->isa, j->transA, j->transB, j->M, n, j->K, j->alpha, j->A, j->lda, B,
                        j->ldb, j->beta, j->C + lo, j->ldc);
    } else {
        int m = ql_min_i(j->chunk, j->M - lo);
        if (m <= 0) return;
        const float *A = j->transA ? j->A + lo : j->A + (size_t)lo * j->lda;
        ql_sgemm_serial(j->isa, j->transA, j->transB, m, j->N, j->K, j->alpha, A, j->lda, j->B,
                        j->ldb, j->beta, j->C + (size_t)lo * j->ldc, j->ldc);
    }
}

int ql_sgemm_isa(ql_isa isa, int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    int st = check_args(transA, transB, M, N, K, lda, ldb, ldc);
    if (st) return st;
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    int threads = ql_get_num_threads();
    double flops = 2.0 * M * N * (double)K;
    if (threads <= 1 || flops < 2e6 || level == QL_ISA_REF) {
        ql_sgemm_serial(level, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return QL_OK;
    }
    /* Split the larger output dimension into one slice per thread, aligned to the tile. */
    sgemm_job j = {level, transA, transB, M, N, K, lda, ldb, ldc, N >= M, 0, alpha, beta, A, B, C};
    int align = j.split_n ? 32 : 12, extent = j.split_n ? N : M;
    int tasks = ql_min_i(threads, (extent + align - 1) / align);
    j.chunk = ((extent + tasks - 1) / tasks + align - 1) / align * align;
    tasks = (extent + j.chunk - 1) / j.chunk;
    ql_parallel_for(tasks, sgemm_task, &j);
    return QL_OK;
}

int ql_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
             const float *B, int ldb, float beta, float *C, int ldc) {
    return ql_sgemm_isa(QL_ISA_BEST, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
