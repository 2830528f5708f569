/* Private helpers shared by the kernel files; not part of the ABI. */
#ifndef QUANTLAB_CKERNELS_INTERNAL_H
#define QUANTLAB_CKERNELS_INTERNAL_H
#include "ckernels.h"

/* Run fn(task, ctx) for task in [0, ntasks) on the persistent pool; the caller thread takes
 * part. Blocks until every task is done. Nested calls (from inside a task) run serially. */
typedef void (*ql_task_fn)(int task, void *ctx);
void ql_parallel_for(int ntasks, ql_task_fn fn, void *ctx);

/* Resolve QL_ISA_BEST and check support: returns the concrete level or -1. */
int ql_resolve_isa(ql_isa isa);

/* 64-byte aligned scratch; NULL on failure. */
void *ql_aligned_alloc(size_t bytes);
void ql_aligned_free(void *p);

/* A scratch buffer that grows on demand and is kept for reuse (declare it _Thread_local so
 * each worker has its own). Returns the buffer with at least `bytes`, or NULL when the
 * allocation fails (the old contents are not preserved). */
typedef struct {
    void *ptr;
    size_t bytes;
} ql_scratch;
void *ql_scratch_reserve(ql_scratch *s, size_t bytes);

/* Serial SGEMM on one thread (used inside parallel regions). Same contract as ql_sgemm. */
void ql_sgemm_serial(int isa, int transA, int transB, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C,
                     int ldc);

/* Operands that the caller packs into the micro-kernel's panels itself instead of having them
 * read from a matrix in memory: a convolution's implicit GEMM (conv.c) packs panels of its
 * im2col matrix straight from the image, so that matrix is never written. pack_b fills
 * Bp[panel][k][c] = B[k0 + k][j0 + panel*NR + c] for c < nc - panel*NR, zero beyond (B as the
 * K x N operand); pack_a fills Ap[panel][k][r] = A[i0 + panel*MR + r][k0 + k], zero rows
 * beyond mc (A as the M x K operand). Either may be NULL (then that operand comes as usual). */
typedef struct {
    void (*pack_b)(const void *ctx, float *Bp, int NR, int j0, int nc, int k0, int kc);
    void (*pack_a)(const void *ctx, float *Ap, int MR, int i0, int mc, int k0, int kc);
    const void *ctx;   /* pack_a's, and pack_b's when ctx_b is NULL */
    const void *ctx_b; /* pack_b's own, where both operands are packed */
} ql_operand_packers;

/* The micro-kernel's tile width (columns of C) at a resolved level above ref. */
int ql_sgemm_panel_width(int isa);

/* C = A B + beta C on the calling thread (isa: a resolved level above ref), A pre-packed by
 * ql_sgemm_pack_a (Ap) or, with Ap NULL, by pk->pack_a; B by pk->pack_b, or read from B as
 * ql_sgemm_packed_a_serial does. The blocking and summation order are ql_sgemm_serial's, so
 * the same operand values give the same bits. QL_ENOMEM (C untouched) without scratch. */
int ql_sgemm_packers_serial(int isa, int M, int N, int K, const float *Ap, int transB, const float *B, int ldb,
                            const ql_operand_packers *pk, float beta, float *C, int ldc);

/* The INT8 epilogue of a block of int32 accumulators (rows x ncols, row stride ldacc) for rows
 * m0.. and columns n0.. of the output (int8 codes when to_s8, else floats; row stride ldo), with
 * ep's per-column arrays read from n0: the one call the GEMM (igemm.c) and the direct conv
 * (iconv.c) share. Returns the epilogue's status. */
int ql_epilogue_block(int isa, int to_s8, void *out, int ldo, int m0, int n0, int rows, int ncols,
                      const int32_t *acc, int ldacc, const ql_requant_params *ep);
/* Whether any of n bytes is -128 (iconv.c): the kernels on signed codes need weights in
 * [-127, 127] (|a| * sign(b, a) negates b). */
int ql_contains_minus_128(const int8_t *x, size_t n);

/* The direct FP32 conv forward (conv_direct.c): whether it applies at a resolved level (AVX2,
 * one group), its packed weights' size and packing, and the forward on them: y = conv(x) (+ b),
 * ReLU when act is 1, SiLU when 2, ql_conv2d_fwd's bits; with accumulate, y = y + conv(x) (the sum as
 * without, then added). QL_ENOMEM without scratch, QL_EINVAL for a bad geometry. */
int ql_conv_direct_applies(int level, const ql_conv_geom *g);
size_t ql_conv_direct_packed_floats(const ql_conv_geom *g);
void ql_conv_direct_pack(float *restrict wp, const float *restrict w, const ql_conv_geom *g);
int ql_conv_direct_fwd(float *y, const float *x, const float *wp, const float *b, const ql_conv_geom *g, int act, int accumulate);
/* The same with the input and output in either layout (ql_layout): a padded NHWC input must
 * carry the conv's own padding, and an NHWC output cannot be accumulated into (QL_EINVAL). */
int ql_conv_direct_fwd_layout(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *wp, const float *b,
                              const ql_conv_geom *g, int act, int accumulate);
/* dw += the weight gradient of a one-group conv (no bias), on the direct kernel: per task of
 * consecutive images a partial sum (each image's pixels summed from zero, then added), the
 * partials added to dw in task order. QL_ENOMEM (dw untouched) without scratch;
 * QL_EUNSUPPORTED for images too large for its int offsets (the caller takes the GEMM). */
int ql_conv_direct_bwd_weight(float *dw, const float *dy, const float *x, const ql_conv_geom *g);
/* xp = x with PH rows and PW columns of zeros around each of its C planes of H x W (conv.c). */
void ql_pad_planes(float *restrict xp, const float *restrict x, int C, int H, int W, int PH, int PW);

static inline int ql_min_i(int a, int b) { return a < b ? a : b; }

#include <math.h>

/* TensorRT's symmetric quantization of one value: code = clamp(round_half_to_even(x / s),
 * -lim, lim). The one definition behind the fake quantizer and the engine's int8 tensors, so
 * their codes agree bit for bit (nearbyintf rounds half to even in the default mode). */
static inline float ql_code(float x, float s, float lim) {
    float q = nearbyintf(x / s);
    return q > lim ? lim : (q < -lim ? -lim : q);
}

/* exp(t) for t <= 0, the one exponential behind the logistic function (and so SiLU) in the
 * elementwise ops and the INT8 epilogue. Written out rather than libm's expf so that the AVX2
 * loops compute the same bits 8 at a time (ql_exp_nonpos8 below: the same operations, each a
 * correctly rounded float operation, fmaf where it has an FMA). t = n ln2 + r, |r| <= ln2/2
 * (ln2 in two parts, so r is exact); exp(r) by Cephes' degree-7 minimax form
 * 1 + r + r^2 P(r); times 2^n built in the exponent bits. Within 2 ulp of exp over
 * [-87, 0] (tested); t below -87 (and NaN) gives exp(-87) ~ 1.6e-38, which only the caller's
 * NaN check and products can tell from exp(t). */
#define QL_EXP_P0 1.9875691500e-4f
#define QL_EXP_P1 1.3981999507e-3f
#define QL_EXP_P2 8.3334519073e-3f
#define QL_EXP_P3 4.1665795894e-2f
#define QL_EXP_P4 1.6666665459e-1f
#define QL_EXP_P5 5.0000001201e-1f
#define QL_LOG2E 1.44269504088896341f
#define QL_LN2_HI 0.693359375f
#define QL_LN2_LO (-2.12194440e-4f)
static inline float ql_exp_nonpos(float t) {
    t = t > -87.0f ? t : -87.0f; /* NaN -> -87, as _mm256_max_ps(t, -87) */
    float n = nearbyintf(t * QL_LOG2E);
    float r = fmaf(n, -QL_LN2_HI, t);
    r = fmaf(n, -QL_LN2_LO, r);
    float p = fmaf(QL_EXP_P0, r, QL_EXP_P1);
    p = fmaf(p, r, QL_EXP_P2);
    p = fmaf(p, r, QL_EXP_P3);
    p = fmaf(p, r, QL_EXP_P4);
    p = fmaf(p, r, QL_EXP_P5);
    float z = r * r;
    p = fmaf(p, z, r);
    p = p + 1.0f;
    union { int32_t i; float f; } two_n = {((int32_t)n + 127) << 23}; /* n in [-126, 0] */
    return p * two_n.f;
}

/* The logistic function without overflow for large |x|: e = exp(-|x|), then 1 / (1 + e) for
 * x >= 0, e / (1 + e) below; NaN stays NaN. SiLU is x * this. */
static inline float sigmoidf_stable(float x) {
    float e = ql_exp_nonpos(-fabsf(x)), d = 1.0f + e;
    float s = x >= 0.0f ? 1.0f / d : e / d;
    return x != x ? x : s;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* The same, 8 lanes: bit for bit the scalar functions above (tested). */
__attribute__((target("avx2,fma"))) static inline __m256 ql_exp_nonpos8(__m256 t) {
    t = _mm256_max_ps(t, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(QL_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-QL_LN2_HI), t);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-QL_LN2_LO), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(QL_EXP_P0), r, _mm256_set1_ps(QL_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QL_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QL_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QL_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QL_EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* One k-group of a u8 x s8 `vpmaddubsw` kernel (igemm.c, iconv.c): per int32 lane, the sum of
 * the 4 byte products of a (A's 4 bytes, in every lane) with a strip of packed B, s16 pair
 * sums added by `vpmaddwd` with ones. Unsigned A: every byte at most 127, so |a1*b1 + a2*b2|
 * <= 2*127*128 = 32512 never saturates. signed_a: A's bytes are signed codes, multiplied as
 * |a| * (b with a's sign), u8 x s8 again (|-128| read as u8 is 128: 2*128*127 = 32512), exact
 * while B has no -128 (its negation wraps; the callers check with ql_contains_minus_128). */
__attribute__((target("avx2"))) static inline __m256i ql_dot4_u8s8(__m256i a, __m256i b, int signed_a) {
    __m256i pairs = signed_a ? _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(b, a)) : _mm256_maddubs_epi16(a, b);
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma"))) static inline __m256 ql_sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 e = ql_exp_nonpos8(_mm256_or_ps(x, _mm256_set1_ps(-0.0f))), d = _mm256_add_ps(one, e);
    __m256 s = _mm256_blendv_ps(_mm256_div_ps(e, d), _mm256_div_ps(one, d), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
    return _mm256_blendv_ps(s, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
/* The activation a conv writes its output through: act 0 none, 1 ReLU (y > 0 ? y : 0), 2 SiLU
 * (y * sigmoid(y), the SiLU op's bits: ql_sigmoid8 is its scalar function 8 lanes at a time). */
__attribute__((target("avx2,fma"))) static inline __m256 ql_activate8(__m256 v, int act) {
    if (act == 1) return _mm256_max_ps(v, _mm256_setzero_ps());
    if (act == 2) return _mm256_mul_ps(v, ql_sigmoid8(v));
    return v;
}
#endif
static inline float ql_activate1(float v, int act) {
    if (act == 1) return v > 0.0f ? v : 0.0f;
    if (act == 2) return v * sigmoidf_stable(v);
    return v;
}
static inline int ql_max_i(int a, int b) { return a > b ? a : b; }
#endif
