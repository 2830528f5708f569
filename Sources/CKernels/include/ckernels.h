/*
 * ckernels.h — the QuantLab kernel ABI.
 *
 * Every hot loop of QuantLab lives behind this header. The CUDA plugin (cuda/) implements
 * the same contracts, so a caller can swap devices without changing its arithmetic.
 *
 * Conventions (apply to every kernel unless its contract says otherwise):
 *   - Outputs come first in the argument list, then inputs, then sizes.
 *   - Matrices are row-major; `ld*` is the distance in elements between consecutive rows.
 *   - Images are NCHW float32, contiguous.
 *   - Sizes are `int64_t` where a product can exceed 2^31, `int` for dimensions.
 *   - Pointers marked `restrict` must not alias; pointers without it may.
 *   - Every kernel with a SIMD version has a scalar `*_ref` twin: the `_ref` version IS the
 *     specification, the fast one must match it within the tolerance its contract states.
 *   - Kernels that can fail return `int`: QL_OK (0) or a negative QL_E* code.
 *   - Gradient kernels (`*_bwd`) ACCUMULATE (`+=`) into their gradient outputs, so that a
 *     tensor used twice in a graph receives the sum of both contributions.
 */
#ifndef QUANTLAB_CKERNELS_H
#define QUANTLAB_CKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------
 * Status codes, CPU features, threads
 * ---------------------------------------------------------------------------------------- */

enum {
    QL_OK = 0,
    QL_EINVAL = -1,       /* a size or stride is negative or inconsistent */
    QL_EUNSUPPORTED = -2, /* the requested ISA is not available on this CPU (ql_iconv_*: the route does not apply) */
    QL_ENOMEM = -3,       /* scratch allocation failed */
};

/* Instruction-set levels. A kernel called with an ISA the CPU lacks returns QL_EUNSUPPORTED. */
typedef enum {
    QL_ISA_REF = 0,    /* scalar C: the specification */
    QL_ISA_AVX2 = 1,   /* AVX2 + FMA (int8: vpmaddubsw when A <= 127, else sign-extend + vpmaddwd; exact) */
    QL_ISA_AVX512 = 2, /* AVX-512F/BW/VL (int8: AVX-512 VNNI vpdpbusd) */
    QL_ISA_BEST = 99,  /* the fastest level this CPU supports */
} ql_isa;

/* 1 if this CPU (and OS, via XGETBV) supports the level, else 0. QL_ISA_AVX512 requires
 * AVX512F+BW+VL+VNNI, so that float and int8 kernels share one level. */
int ql_isa_supported(ql_isa isa);
/* The fastest supported level, honouring the environment variable QL_ISA=ref|avx2|avx512
 * (a cap, useful to test dispatch on a big CPU). */
ql_isa ql_isa_best(void);
const char *ql_isa_name(ql_isa isa);

/* Worker threads used by the parallel kernels (the calling thread counts as one).
 * Default: the QL_NUM_THREADS environment variable, else the number of online CPUs.
 * The pool is persistent (pthreads) because short parallel regions on small VMs are
 * otherwise often serialised on the calling thread. */
void ql_set_num_threads(int n);
int ql_get_num_threads(void);
/* Kernels called from the calling thread run serially on it (nonzero) or use the pool again
 * (zero). For callers that bring their own threads: a multi-instance server runs one engine
 * instance per thread, each serial, as onnxruntime sessions with intra_op_num_threads = 1. */
void ql_set_thread_serial(int serial);
/* The pool's own check: `jobs` consecutive jobs of alternating sizes (2, 9, 40 tasks) on
 * `threads` threads (more than the cores makes preemption likely; for this call's jobs only, the
 * global count that other threads' kernels read is untouched); every task counts its runs
 * in a slot that stays allocated. Returns the number of slots whose count is not exactly one
 * run per task of that job (0 when every task of every job ran once, in its own job). */
long ql_pool_stress(int jobs, int threads);

/* Makes stdout line-buffered, so that progress and results reach a log file as they are
 * printed (Swift 6 cannot touch C's `stdout` global itself). */
void ql_line_buffer_stdout(void);

/* ------------------------------------------------------------------------------------------
 * SGEMM
 *
 *   C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C[M,N]
 *   op(A) = A (A is M x K, lda >= K) or A^T (A is K x M, lda >= M) when transA != 0
 *   op(B) = B (B is K x N, ldb >= N) or B^T (B is N x K, ldb >= K) when transB != 0
 *   beta == 0: C is overwritten and never read (NaNs in C do not propagate).
 *   K == 0: C = beta * C.
 * Accumulation in float32. Aliasing: C must not overlap A or B.
 * Tolerance of fast versions against ql_sgemm_ref: |c - ref| <= 1e-5*K*max|a|*max|b| + 1e-6*|ref|
 * (the order of the K-sum differs; each version is deterministic for a given thread count).
 * Parallel over the thread pool.
 * ---------------------------------------------------------------------------------------- */
int ql_sgemm(int transA, int transB, int M, int N, int K, float alpha,
             const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
int ql_sgemm_isa(ql_isa isa, int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
int ql_sgemm_ref(int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* A packed once for many products with the same A (a convolution's weights, reused for
 * every image of a batch): ql_sgemm_pack_a writes op(A) * alpha as the micro-kernel's panels
 * for `isa` (avx2 or avx512, capped like ql_sgemm_isa; not ref: QL_EINVAL) into Ap, which
 * holds ql_sgemm_packed_a_floats(isa, M, K) floats; ql_sgemm_packed_a_serial then computes
 * C = [alpha op(A)] * op(B) + beta * C on the calling thread, with the same summation order,
 * so the same bits, as ql_sgemm_isa on one thread. Pack and multiply with the same isa.
 * ql_sgemm_packed_a_serial returns QL_ENOMEM, C untouched, if its B scratch cannot be had. */
size_t ql_sgemm_packed_a_floats(ql_isa isa, int M, int K);
int ql_sgemm_pack_a(ql_isa isa, int transA, int M, int K, float alpha, const float *A, int lda, float *Ap);
int ql_sgemm_packed_a_serial(ql_isa isa, int M, int N, int K, const float *Ap, int transB, const float *B,
                             int ldb, float beta, float *C, int ldc);

/* ------------------------------------------------------------------------------------------
 * INT8 GEMM, u8 x s8 -> s32, with a per-output-channel epilogue
 *
 * The INT8 engine computes a conv/linear layer as C[M = pixels, N = out channels] =
 * A[M,K] (activations) x B[K,N] (weights). TensorRT-style activations are symmetric int8;
 * the VNNI instruction multiplies unsigned by signed bytes, so callers pass A as
 * u8 = s8 + 128 and add the compensation col_offset[n] = -128 * sum_k B[k,n] in the epilogue
 * (ql_igemm_pack_b computes it).
 *
 * Step 1, pack the weights once:  size = ql_igemm_packed_size(K, N) bytes.
 *   ql_igemm_pack_b(packed, col_sum, B, ldb, K, N): B is K x N int8 row-major; col_sum[n] =
 *   sum_k B[k,n] (may be NULL). The packed layout is private to the CPU kernels.
 * Step 2, multiply:  C[m,n] = sum_k A[m,k] * B[k,n], exact int32 (no saturation anywhere;
 *   K <= 2^16 keeps |C| < 2^31 for any u8/s8 inputs).
 * Step 3, epilogue (per output channel n, per row m):
 *   v = fmaf((float)(acc[m,n] + col_offset[n]), scale[n], bias[n])      (fmaf: one rounding)
 *   relu 1: v = max(v, 0); relu 2: v = v * sigmoid(v) (SiLU: the elementwise op's floats, bit
 *   for bit, from the one exponential both use; 8 at a time from AVX2 on)
 *   ql_requantize_s8: out = (int8) clamp(round_half_to_even(v), -127, 127)
 *   ql_dequantize_f32: out = v
 *   col_offset and bias may be NULL (read as 0). Fast versions are BIT-EXACT against _ref.
 * ---------------------------------------------------------------------------------------- */
size_t ql_igemm_packed_size(int K, int N);
int ql_igemm_pack_b(void *restrict packed, int32_t *restrict col_sum, const int8_t *restrict B,
                    int ldb, int K, int N);
int ql_igemm_u8s8s32(int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     int32_t *C, int ldc);
int ql_igemm_u8s8s32_isa(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda,
                         const void *packed, int32_t *C, int ldc);
/* Reference on the UNPACKED weights B (K x N, row-major). */
int ql_igemm_u8s8s32_ref(int M, int N, int K, const uint8_t *A, int lda, const int8_t *B, int ldb,
                         int32_t *C, int ldc);

/* Fused GEMM + epilogue: C never leaves the thread's cache-sized block buffer; results are
 * bit-exact against ql_igemm_u8s8s32_ref followed by ql_requantize_s8_ref (or
 * ql_dequantize_f32_ref). This is the call the INT8 engine makes per conv/linear layer. */
typedef struct {
    const int32_t *col_offset; /* N entries or NULL */
    const float *scale;        /* N entries, required */
    const float *bias;         /* N entries or NULL */
    int relu;
} ql_requant_params;
int ql_igemm_u8s8_s8(int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     const ql_requant_params *ep, int8_t *out, int ldo);
int ql_igemm_u8s8_s8_isa(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda,
                         const void *packed, const ql_requant_params *ep, int8_t *out, int ldo);
int ql_igemm_u8s8_f32(int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                      const ql_requant_params *ep, float *out, int ldo);
int ql_igemm_u8s8_f32_isa(ql_isa isa, int M, int N, int K, const uint8_t *A, int lda,
                          const void *packed, const ql_requant_params *ep, float *out, int ldo);
/* The same with A as signed codes (int8; symmetric quantization needs no + 128 and no
 * column-sum offset, though ep->col_offset is applied if given). B must have no -128 (the
 * AVX2 kernel forms a * b as |a| * (b with a's sign)): QL_EUNSUPPORTED otherwise, on every
 * ISA, and the caller takes the u8 route. Bit-exact against the s8 x s8 product followed by
 * ql_dequantize_f32_ref. */
int ql_igemm_s8s8_f32(int M, int N, int K, const int8_t *A, int lda, const void *packed,
                      const ql_requant_params *ep, float *out, int ldo);
int ql_igemm_s8s8_f32_isa(ql_isa isa, int M, int N, int K, const int8_t *A, int lda,
                          const void *packed, const ql_requant_params *ep, float *out, int ldo);

int ql_requantize_s8(int M, int N, int8_t *restrict out, int ldo, const int32_t *restrict acc,
                     int ldacc, const int32_t *col_offset, const float *scale, const float *bias,
                     int relu);
int ql_requantize_s8_isa(ql_isa isa, int M, int N, int8_t *restrict out, int ldo,
                         const int32_t *restrict acc, int ldacc, const int32_t *col_offset,
                         const float *scale, const float *bias, int relu);
int ql_requantize_s8_ref(int M, int N, int8_t *restrict out, int ldo, const int32_t *restrict acc,
                         int ldacc, const int32_t *col_offset, const float *scale,
                         const float *bias, int relu);
int ql_dequantize_f32(int M, int N, float *restrict out, int ldo, const int32_t *restrict acc,
                      int ldacc, const int32_t *col_offset, const float *scale, const float *bias,
                      int relu);
int ql_dequantize_f32_ref(int M, int N, float *restrict out, int ldo, const int32_t *restrict acc,
                          int ldacc, const int32_t *col_offset, const float *scale,
                          const float *bias, int relu);

/* ------------------------------------------------------------------------------------------
 * Fake quantization and calibration reductions
 *
 * Symmetric fake quantization, the TensorRT convention: with s = amax/qmax,
 *   y = clamp(round_half_to_even(x / s), -qmax, qmax) * s
 * amax <= 0 gives y = 0. Division (not multiplication by 1/s) so that the result matches
 * pytorch-quantization. Per channel: x is [outer, channels, inner] and channel c uses amax[c]
 * (weights: outer = 1, channels = K, inner = C*KH*KW).
 * Backward (straight-through estimator, zero outside the clipping range):
 *   dx += dy where |x| <= amax, else 0.
 * ---------------------------------------------------------------------------------------- */
void ql_fake_quant_f32(float *restrict y, const float *restrict x, int64_t n, float amax, int qmax);
void ql_fake_quant_per_channel_f32(float *restrict y, const float *restrict x, int64_t outer,
                                   int channels, int64_t inner, const float *amax, int qmax);
void ql_fake_quant_bwd_f32(float *restrict dx, const float *restrict dy, const float *restrict x,
                           int64_t n, float amax);
void ql_fake_quant_per_channel_bwd_f32(float *restrict dx, const float *restrict dy,
                                       const float *restrict x, int64_t outer, int channels,
                                       int64_t inner, const float *amax);
/* Asymmetric (affine) fake quantization for backends with uint8 activations:
 *   q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax), y = (q - zero_point) * scale
 * (uint8: qmin 0, qmax 255). scale <= 0 gives y = 0. Backward: dx += dy where
 * (qmin - zero_point) * scale <= x <= (qmax - zero_point) * scale, else 0. */
void ql_fake_quant_affine_f32(float *restrict y, const float *restrict x, int64_t n, float scale, int zero_point,
                              int qmin, int qmax);
void ql_fake_quant_affine_bwd_f32(float *restrict dx, const float *restrict dy, const float *restrict x, int64_t n,
                                  float scale, int zero_point, int qmin, int qmax);
/* amax[c] = max |x| over outer and inner for each channel (x is [outer, channels, inner]). */
void ql_channel_absmax_f32(float *restrict amax, const float *restrict x, int64_t outer,
                           int channels, int64_t inner);
/* Histogram of |x| over [0, range): bin = floor(|x| / range * bins), values >= range go to the
 * last bin; counts ACCUMULATE (+=), so a calibrator can feed batch after batch. */
void ql_histogram_abs_f32(int64_t *restrict counts, int bins, const float *restrict x, int64_t n,
                          float range);

/* ------------------------------------------------------------------------------------------
 * im2col / col2im and convolution drivers
 *
 * Geometry of a 2-D convolution on ONE image and ONE group of channels:
 *   input x[C, H, W]; kernel KH x KW; stride SH, SW; zero padding PH, PW; dilation DH, DW;
 *   OH = (H + 2*PH - DH*(KH-1) - 1) / SH + 1   (likewise OW)
 *   col[(c*KH + kh)*KW + kw, oh*OW + ow] = x[c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW]
 *   (0 outside the image). col is (C*KH*KW) x (OH*OW), row-major.
 * col2im is the adjoint: it ACCUMULATES every col entry back into x (x += col2im(col)).
 * Groups: callers pass the group's channel slice (x + g*C_g*H*W) with C = C_g.
 * ---------------------------------------------------------------------------------------- */
typedef struct {
    int N, C, H, W;       /* input batch, channels, height, width */
    int K;                /* output channels */
    int KH, KW;           /* kernel size */
    int SH, SW;           /* stride */
    int PH, PW;           /* zero padding */
    int DH, DW;           /* dilation */
    int groups;           /* C % groups == 0 and K % groups == 0 */
} ql_conv_geom;

/* Output size; returns QL_EINVAL (and leaves OH/OW untouched) for an impossible geometry. */
int ql_conv_out_size(const ql_conv_geom *g, int *OH, int *OW);

/* ---- INT8 activation tensors of the engine (qtensor.c): signed codes in NHWC order ---- */
/* code = clamp(round_half_to_even(x / s), -qmax, qmax) with s = amax / qmax computed as the fake
 * quantizer does (so codes equal the simulator's bit for bit); x is NCHW [N, C, HW], out NHWC. */
void ql_quantize_nchw_to_nhwc_s8(int8_t *restrict out, const float *restrict x, int N, int C, int HW,
                                 float amax, int qmax);
/* out[n, c, p] = q[n, p, c] * scale (NHWC codes back to NCHW floats). */
void ql_dequantize_nhwc_to_nchw_f32(float *restrict out, const int8_t *restrict q, int N, int C, int HW,
                                   float scale);
/* code = clamp(round_half_to_even(x / s), -qmax, qmax), s = amax / qmax, for n floats in any
 * layout (the fake quantizer's codes, element by element). */
void ql_quantize_s8(int8_t *restrict out, const float *restrict x, int64_t n, float amax, int qmax);
/* The smallest of n codes (127 for n == 0): 0 or more means the u8 view needs no offset. */
int ql_s8_min(const int8_t *x, int64_t n);
/* im2col of NHWC codes for a u8 x s8 GEMM: row (n, oh, ow), column (kh, kw, c), value
 * code + offset as u8 (offset 0 for non-negative codes, 128 otherwise; the GEMM's column
 * offset then subtracts offset * sum_k w). Outside the image: offset (the code 0). groups must
 * be 1. Returns QL_EINVAL for a bad geometry or offset. */
int ql_im2col_nhwc_s8u8(uint8_t *restrict col, const int8_t *restrict x, const ql_conv_geom *g, int offset);
/* Direct INT8 conv (iconv.c): out[(n, oh, ow), k] = epilogue(sum over (kh, kw, c) of
 * x[n, ih, iw, c] * w) for NHWC s8 codes x (no offset: the codes themselves, signed or not),
 * with the weights packed by ql_igemm_pack_b as the K = KH*KW*C x g->K operand in (kh, kw, c)
 * order (the order of ql_im2col_nhwc_s8u8) and the epilogue of the INT8 GEMM (ep: g->K
 * entries). Output NHWC [N*OH*OW, g->K]. Bit for bit ql_im2col_nhwc_s8u8 + ql_igemm_u8s8_s8/_f32
 * on the same operands (with the 128 offset and its column compensation for signed codes),
 * without the column matrix. Returns QL_EUNSUPPORTED, writing nothing, where this route does
 * not apply and the caller should take the im2col one: C % 4 != 0 (pad the channels, below),
 * groups != 1, more than 64 taps, or signed codes with a weight of -128. QL_ISA_REF runs the
 * scalar specification; AVX2 and AVX-512 run the AVX2 kernels (no VNNI kernel here yet). */
int ql_iconv_nhwc_s8_isa(ql_isa isa, const ql_conv_geom *g, const int8_t *x, const void *packed,
                         const ql_requant_params *ep, int8_t *out);
int ql_iconv_nhwc_f32_isa(ql_isa isa, const ql_conv_geom *g, const int8_t *x, const void *packed,
                          const ql_requant_params *ep, float *out);
/* NHWC codes with C channels to Cp >= C channels, the new ones 0 (a conv's input padded to a
 * multiple of 4 channels for ql_iconv_nhwc_*, its weights padded with zeros to match). */
void ql_pad_channels_nhwc_s8(int8_t *restrict out, const int8_t *restrict x, int64_t pixels, int C, int Cp);
/* Codes at one scale to codes at another, as two quantizers in a row compute it:
 * out = clamp(RNE((in * scale_in) / (amax_out / qmax)), -qmax, qmax). */
void ql_requantize_codes_s8(int8_t *restrict out, const int8_t *restrict in, int64_t n, float scale_in, float amax_out, int qmax);
/* Max pooling of NHWC codes (k x k window, stride, zero-size padding that never wins, pad <= k/2):
 * the max commutes with a monotone quantizer, so this equals quantizing the float max pool. */
int ql_maxpool_nhwc_s8(int8_t *restrict out, const int8_t *restrict x, int N, int H, int W, int C, int k, int stride, int pad);
/* Concatenation of NHWC code tensors along channels: inputs[i] has channels[i] per pixel. */
void ql_concat_channels_nhwc_s8(int8_t *restrict out, const int8_t *const *inputs, const int *channels, int count, int64_t pixels);

void ql_im2col(float *restrict col, const float *restrict x, int C, int H, int W, int KH, int KW,
               int SH, int SW, int PH, int PW, int DH, int DW);
void ql_col2im(float *restrict x, const float *restrict col, int C, int H, int W, int KH, int KW,
               int SH, int SW, int PH, int PW, int DH, int DW);

/* Convolution, weights w[K, C/groups, KH, KW], bias b[K] (may be NULL), NCHW in and out.
 *   fwd:         y[n,k,oh,ow] = b[k] + sum_{c in group(k), kh, kw} w[k,c,kh,kw] * x[n,c,ih,iw]
 *   bwd_data:    dx += dL/dx given dy            (the transposed convolution of dy)
 *   bwd_weight:  dw += dL/dw, db += dL/db (db may be NULL)
 * Implementation, AVX2 with one group (conv_direct.c): a direct kernel, 16 output channels x 6
 * (or 5) pixels a tile, reading a zero-padded copy of the image through one offset table (no
 * im2col matrix, no packed panels). fwd (not pointwise) sums as im2col + SGEMM does, so the
 * same bits; bwd_data of a stride-1 conv (not pointwise) is the conv of dy with the
 * transposed, flipped weights, added to dx; bwd_weight sums up to 2048 pixels of several
 * images per pass into per-task partials added in task order. Elsewhere (AVX-512, groups,
 * pointwise forward and data gradient, strided data gradient): SGEMM per group with the
 * weights packed once per call; fwd and bwd_weight pack the im2col matrix's panels straight
 * from a zero-padded copy of the image (implicit GEMM), fwd and bwd_data put several small
 * maps' pixels side by side in one GEMM; images spread over the thread pool, or one image's
 * pixels when the batch is smaller than the thread count; fwd and bwd_data give im2col +
 * SGEMM's bits per image, bwd_weight reduces per-thread partial sums in a fixed order. Every
 * route's results are deterministic for a thread count (the tests reproduce each order).
 * The _ref versions are direct loops over the definition above. Tolerance as SGEMM with
 * K = C/groups*KH*KW (fwd, bwd_weight over N*OH*OW terms, bwd_data over K/groups*KH*KW terms). */
int ql_conv2d_fwd(float *y, const float *x, const float *w, const float *b, const ql_conv_geom *g);
int ql_conv2d_bwd_data(float *dx, const float *dy, const float *w, const ql_conv_geom *g);
int ql_conv2d_bwd_weight(float *dw, float *db, const float *dy, const float *x, const ql_conv_geom *g);
/* The forward with its weights packed once for many calls (an engine's constant weights):
 * ql_conv2d_fwd_packed_floats(g) floats (0 at the reference level: nothing to pack), filled
 * by ql_conv2d_fwd_pack, which returns the level it packed for (>= 0) or an error (< 0);
 * ql_conv2d_fwd_prepacked(y, x, w, packed, level, b, g, act) then computes ql_conv2d_fwd's bits
 * without packing w again (w is still read where the packed form does not apply, and the
 * weights are packed anew when `level` is not the level in force); act 1 applies ReLU
 * (y > 0 ? y : 0) to the output as it is written, act 2 SiLU (the SiLU op's bits: its
 * function 8 lanes at a time, as ql_unary_fwd computes it), act 0 nothing. The packed layout depends on
 * the level and on the kernel's size, stride and padding, not on the input's size. */
size_t ql_conv2d_fwd_packed_floats(const ql_conv_geom *g);
int ql_conv2d_fwd_pack(float *packed, const float *w, const ql_conv_geom *g);
int ql_conv2d_fwd_prepacked(float *y, const float *x, const float *w, const float *packed, int level, const float *b,
                            const ql_conv_geom *g, int act);
/* Chains of convs without a layout pass between them (an engine's FP32 plan). A float tensor's
 * layout: NCHW (nhwc 0, ph = pw = 0), or NHWC with a zero border of ph rows above and below
 * and pw columns either side: [N][H + 2ph][W + 2pw][C], the copy the direct kernel makes of an
 * NCHW input before it convolves it. ql_conv2d_fwd_prepacked_layout is
 * ql_conv2d_fwd_prepacked with the input and the output in either layout; a padded NHWC input
 * must carry the conv's own padding (PH, PW), else QL_EINVAL. An NHWC output gets its border
 * zeroed and its interior written. The values are ql_conv2d_fwd_prepacked's bits in every
 * layout. Where the direct kernel runs the forward (ql_conv2d_fwd_direct: AVX2, one group,
 * not pointwise) it reads a padded NHWC input as it is and writes an NHWC output pixel by
 * pixel, so a chain of such convs skips the NCHW -> NHWC copy of each input and the transpose
 * of each output; elsewhere the layouts are converted around the NCHW forward (correct, no
 * faster). ql_nchw_to_nhwc / ql_nhwc_to_nchw convert (the reference the tests use). */
typedef struct {
    int nhwc, ph, pw;
} ql_layout;
int ql_conv2d_fwd_direct(const ql_conv_geom *g);
int ql_conv2d_fwd_prepacked_layout(float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *w, const float *packed,
                                   int level, const float *b, const ql_conv_geom *g, int act);
void ql_nchw_to_nhwc(float *restrict dst, const float *restrict src, int N, int C, int H, int W, int ph, int pw);
void ql_nhwc_to_nchw(float *restrict dst, const float *restrict src, int N, int C, int H, int W, int ph, int pw);
/* Winograd F(2x2, 3x3) forward (conv_winograd.c) for a 3x3 stride-1 undilated conv of one
 * group (ql_winograd_f23_applies), any padding: y = act(conv(x, w) + b) with the weights
 * transformed once by ql_winograd_f23_pack into W (ql_winograd_f23_packed_floats(isa, g)
 * floats: 16 matrices K x C, as the SGEMM's packed A for isa; pack and run with one isa). x and y in the layouts of ql_conv2d_fwd_prepacked_layout (a padded NHWC
 * input carries the conv's padding; an NHWC output gets its border zeroed). NOT the direct
 * conv's bits: 2.25x fewer multiplies, the sums in another order (error within a few units in
 * the last place of sum |x| |w|, tested). act 0 none, 1 ReLU, 2 SiLU (the ops' functions).
 * isa ref runs the scalar transforms and the reference GEMM. QL_EINVAL for a bad geometry or
 * layout, QL_ENOMEM without scratch. */
int ql_winograd_f23_applies(const ql_conv_geom *g);
size_t ql_winograd_f23_packed_floats(ql_isa isa, const ql_conv_geom *g);
int ql_winograd_f23_pack(ql_isa isa, float *W, const float *w, const ql_conv_geom *g);
int ql_winograd_f23_fwd_layout(ql_isa isa, float *y, ql_layout ylay, const float *x, ql_layout xlay, const float *W,
                               const float *b, const ql_conv_geom *g, int act);
int ql_conv2d_fwd_ref(float *y, const float *x, const float *w, const float *b, const ql_conv_geom *g);
int ql_conv2d_bwd_data_ref(float *dx, const float *dy, const float *w, const ql_conv_geom *g);
int ql_conv2d_bwd_weight_ref(float *dw, float *db, const float *dy, const float *x,
                             const ql_conv_geom *g);

/* ------------------------------------------------------------------------------------------
 * Elementwise, broadcasting and reductions
 *
 * These are memory-bound; each is one plain C loop (the specification) that the compiler
 * vectorises at -O3. Shapes are passed as up to QL_MAX_DIMS dims with element strides; a
 * stride of 0 broadcasts that operand along the dim.
 * ---------------------------------------------------------------------------------------- */
#define QL_MAX_DIMS 8

typedef enum {
    QL_UNARY_RELU = 0,     /* max(x, 0) */
    QL_UNARY_SIGMOID = 1,  /* 1 / (1 + exp(-x)), computed without overflow */
    QL_UNARY_SILU = 2,     /* x * sigmoid(x) */
    QL_UNARY_EXP = 3,
    QL_UNARY_LOG = 4,
    QL_UNARY_NEG = 5,
    QL_UNARY_ABS = 6,
    QL_UNARY_SQRT = 7,
    QL_UNARY_TANH = 8,
    QL_UNARY_GELU = 9,     /* x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), the exact form (not tanh) */
} ql_unary_op;

/* y[i] = f(x[i]); y may alias x. */
void ql_unary_fwd(ql_unary_op op, float *y, const float *x, int64_t n);
/* dx[i] += dy[i] * f'(x[i]); y = f(x) is passed for ops whose derivative uses it
 * (sigmoid, exp, sqrt, tanh) and may be NULL for the others. */
void ql_unary_bwd(ql_unary_op op, float *restrict dx, const float *restrict dy,
                  const float *restrict x, const float *restrict y, int64_t n);
/* The same with accumulate == 0: dx = dy * f'(x), its old contents neither read nor kept
 * (a first gradient written without zero-filling it first). */
void ql_unary_bwd_into(ql_unary_op op, float *restrict dx, const float *restrict dy,
                       const float *restrict x, const float *restrict y, int64_t n, int accumulate);
/* The same at a chosen level: QL_ISA_REF the scalar loops (the specification); from AVX2 on,
 * ReLU's backward and sigmoid / SiLU (forward, and SiLU's backward) run 8 at a time with the
 * same bits. QL_EUNSUPPORTED for a level this CPU lacks. */
int ql_unary_fwd_isa(ql_isa isa, ql_unary_op op, float *y, const float *x, int64_t n);
int ql_unary_bwd_into_isa(ql_isa isa, ql_unary_op op, float *restrict dx, const float *restrict dy,
                          const float *restrict x, const float *restrict y, int64_t n, int accumulate);

typedef enum {
    QL_BINARY_ADD = 0,
    QL_BINARY_SUB = 1,
    QL_BINARY_MUL = 2,
    QL_BINARY_DIV = 3,
    QL_BINARY_MAX = 4,
    QL_BINARY_MIN = 5,
} ql_binary_op;

/* out[i] = a[i] op b[i] over an ndim index space `shape`, each operand addressed by its own
 * element strides (0 = broadcast). out must be dense in the order given by `shape`. */
int ql_binary_strided(ql_binary_op op, float *out, const float *a, const int64_t *a_strides,
                      const float *b, const int64_t *b_strides, const int64_t *shape, int ndim);
/* Gradients of ql_binary_strided: da[a-index] += dout * d(a op b)/da (likewise db).
 * da or db may be NULL to skip. dout is dense in `shape`. Ties of max/min send the gradient
 * to `a`. */
int ql_binary_strided_bwd(ql_binary_op op, float *da, const int64_t *a_strides, float *db,
                          const int64_t *b_strides, const float *dout, const float *a,
                          const float *b, const int64_t *shape, int ndim);

/* out[dense index over shape] = in[strided index] : permute, slice, expand, broadcast copy. */
int ql_copy_strided(float *restrict out, const float *restrict in, const int64_t *in_strides,
                    const int64_t *shape, int ndim);
/* out[strided index] += in[dense index over shape] : the adjoint of ql_copy_strided; when
 * out_strides contains zeros this sums over those dims (reduction to a broadcast shape). */
int ql_accumulate_strided(float *out, const int64_t *out_strides, const float *restrict in,
                          const int64_t *shape, int ndim);

/* y = a*x + y (n elements). */
void ql_axpy(float *restrict y, float a, const float *restrict x, int64_t n);
/* y = a*x + b (n elements); y may alias x. */
void ql_scale_shift(float *y, const float *x, float a, float b, int64_t n);
/* Sum of n elements, accumulated in double (pairwise order is not needed at this precision). */
double ql_sum(const float *x, int64_t n);
/* max |x_i| over n elements (0 for n == 0). */
float ql_absmax(const float *x, int64_t n);
/* Index of the first NaN or infinity among n elements, or -1 when all are finite. */
int64_t ql_first_nonfinite(const float *x, int64_t n);
/* Smallest and largest of n elements (+inf and -inf for n == 0); NaNs are skipped. */
void ql_minmax(const float *x, int64_t n, float *lo, float *hi);

/* Row-wise softmax / log-softmax over the last dim: x is rows x cols. Max-subtracted.
 * softmax: the exponential is ql_exp_nonpos's (within 2 ulp; 0 below -87), the sum in double
 * in a fixed order, so the reference and AVX2 paths give the same bits; _isa as for the GEMMs. */
void ql_softmax_rows(float *y, const float *x, int64_t rows, int cols);
int ql_softmax_rows_isa(ql_isa isa, float *y, const float *x, int64_t rows, int cols);
void ql_log_softmax_rows(float *y, const float *x, int64_t rows, int cols);
/* softmax:     dx += y * (dy - sum_j dy_j y_j)
 * log-softmax: dx += dy - exp(y) * sum_j dy_j          (y is the forward output) */
void ql_softmax_rows_bwd(float *dx, const float *dy, const float *y, int64_t rows, int cols);
void ql_log_softmax_rows_bwd(float *dx, const float *dy, const float *y, int64_t rows, int cols);

/* Layer norm over the last dim (cols): xhat = (x - mean) / sqrt(var + eps), biased var;
 * y = xhat * gamma + beta (gamma/beta may be NULL = 1/0). mean and rstd (rows each) are
 * saved for the backward. */
void ql_layer_norm_fwd(float *y, float *mean, float *rstd, const float *x, const float *gamma,
                       const float *beta, int64_t rows, int cols, float eps);
/* dx += ..., dgamma += sum_rows dy*xhat, dbeta += sum_rows dy (dgamma/dbeta may be NULL). */
void ql_layer_norm_bwd(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                       const float *mean, const float *rstd, const float *gamma, int64_t rows,
                       int cols);

/* Batch norm over N, H, W per channel (x is N x C x HW).
 * stats: mean[c], var[c] (biased) of the batch, accumulated in double.
 * apply: y = (x - mean[c]) * rstd[c] * gamma[c] + beta[c]   (gamma/beta may be NULL) */
void ql_channel_stats(float *mean, float *var, const float *x, int N, int C, int64_t HW);
void ql_batch_norm_apply(float *y, const float *x, const float *mean, const float *rstd,
                         const float *gamma, const float *beta, int N, int C, int64_t HW);
/* Training-mode backward (batch statistics are functions of x):
 *   dxhat = dy * gamma;  dx += rstd/M * (M*dxhat - sum dxhat - xhat * sum dxhat*xhat), M = N*HW
 * dgamma += sum dy*xhat; dbeta += sum dy (either may be NULL). */
void ql_batch_norm_bwd(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                       const float *mean, const float *rstd, const float *gamma, int N, int C,
                       int64_t HW);
/* The same at a chosen level: QL_ISA_REF adds each sum's terms in one chain (the
 * specification); AVX2 and above add the same float terms in 8 double lanes (the sums agree
 * to the order of the additions). QL_EUNSUPPORTED for a level this CPU lacks. With
 * accumulate == 0 the backward writes dx (0 + its term) without reading it: a first gradient
 * needs no zero-filled buffer. */
int ql_channel_stats_isa(ql_isa isa, float *mean, float *var, const float *x, int N, int C, int64_t HW);
int ql_batch_norm_bwd_isa(ql_isa isa, float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                          const float *mean, const float *rstd, const float *gamma, int N, int C, int64_t HW,
                          int accumulate);

/* Pooling on NCHW (planes = N*C). Windows follow the conv geometry; padding for max pooling
 * is -inf (never selected), for average pooling the divisor counts only in-image elements
 * when count_include_pad == 0. Max pooling's value: the largest in-image element, NaN
 * ignored (-inf for a window of NaNs); argmax (may be NULL in eval: then a faster separable
 * loop, the same values) receives the flat input index within the plane of each max, first
 * maximum on ties (the window's first in-image element when none is above -inf). */
void ql_max_pool2d_fwd(float *y, int32_t *argmax, const float *x, int64_t planes, int H, int W,
                       int KH, int KW, int SH, int SW, int PH, int PW);
void ql_max_pool2d_bwd(float *dx, const float *dy, const int32_t *argmax, int64_t planes, int H,
                       int W, int OH, int OW);
void ql_avg_pool2d_fwd(float *y, const float *x, int64_t planes, int H, int W, int KH, int KW,
                       int SH, int SW, int PH, int PW, int count_include_pad);
void ql_avg_pool2d_bwd(float *dx, const float *dy, int64_t planes, int H, int W, int KH, int KW,
                       int SH, int SW, int PH, int PW, int count_include_pad);

/* Nearest-neighbour upsampling by integer factors: y[p, oh, ow] = x[p, oh/FH, ow/FW]. */
void ql_upsample_nearest_fwd(float *restrict y, const float *restrict x, int64_t planes, int H,
                             int W, int FH, int FW);
void ql_upsample_nearest_bwd(float *restrict dx, const float *restrict dy, int64_t planes, int H,
                             int W, int FH, int FW);

/* ------------------------------------------------------------------------------------------
 * Image preprocessing (8-bit RGB, HWC, rows packed). The CPU reference of the detection
 * input pipeline: decode -> resize -> normalise + HWC->CHW (DALI's crop_mirror_normalize).
 * ---------------------------------------------------------------------------------------- */
/* Bilinear resize with half-pixel centres (OpenCV INTER_LINEAR, PyTorch align_corners=False):
 *   src = (dst + 0.5) * (in / out) - 0.5, clamped to the image; result rounded to nearest. */
void ql_resize_bilinear_u8(uint8_t *restrict out, int out_h, int out_w, const uint8_t *restrict in,
                           int in_h, int in_w, int channels);
/* out[c, y, x] = in[y, x, c] * scale[c] + shift[c]  (e.g. scale 1/255, shift 0; or ImageNet
 * mean/std folded in). With flip != 0 the image is mirrored horizontally on the way. */
void ql_u8hwc_to_f32chw(float *restrict out, const uint8_t *restrict in, int h, int w,
                        const float *scale, const float *shift, int flip);
/* The fused letterbox (DALI's idea on a CPU): one pass from a decoded image to the network
 * input. The image in (in_h x in_w, HWC u8) is resized bilinearly to new_h x new_w, placed at
 * (off_y, off_x) on an out_h x out_w canvas filled with the byte pad, and every byte v of
 * channel c is written as lut[c * 256 + v]:
 *   ql_letterbox_f32chw: f32, CHW (lut[c*256+v] = v * scale[c] + shift[c]: normalisation);
 *   ql_letterbox_s8nhwc: int8 codes, NHWC, the layout and codes of the INT8 engine's input
 *                        (lut = the input quantizer applied to the normalised value).
 * Value for value equal to ql_resize_bilinear_u8, a paste on a pad-filled canvas and
 * ql_u8hwc_to_f32chw (same float expressions, same rounding): that composition is the
 * reference. Separable: each output row interpolates its two source rows horizontally from
 * precomputed column tables, then blends them vertically in one contiguous, vectorised loop.
 * Returns -1 (nothing written) unless 0 <= off, off + new <= out and all sizes are positive. */
int ql_letterbox_f32chw(float *restrict out, int out_h, int out_w, const uint8_t *restrict in, int in_h, int in_w,
                        int new_h, int new_w, int off_y, int off_x, uint8_t pad, const float *restrict lut);
int ql_letterbox_s8nhwc(int8_t *restrict out, int out_h, int out_w, const uint8_t *restrict in, int in_h, int in_w,
                        int new_h, int new_w, int off_y, int off_x, uint8_t pad, const int8_t *restrict lut);
/* Colour jitter in HSV: h' = (h * gain_h) mod 360, s' = clamp(s * gain_s), v' = clamp(v * gain_v)
 * (the YOLO augment_hsv gains, applied in floating-point HSV). In place on RGB pixels. */
void ql_hsv_jitter_u8(uint8_t *rgb, int64_t pixels, float gain_h, float gain_s, float gain_v);

/* ------------------------------------------------------------------------------------------
 * Losses (elementwise parts; reductions are done by the caller)
 * ---------------------------------------------------------------------------------------- */
/* BCE with logits, numerically stable:
 *   l_i = max(z,0) - z*t + log(1 + exp(-|z|));  dl/dz = sigmoid(z) - t */
void ql_bce_logits_fwd(float *restrict loss, const float *restrict z, const float *restrict t,
                       int64_t n);
void ql_bce_logits_bwd(float *restrict dz, const float *restrict dloss, const float *restrict z,
                       const float *restrict t, int64_t n);

/* ------------------------------------------------------------------------------------------
 * Optimizer updates (one parameter tensor each, in place)
 * ---------------------------------------------------------------------------------------- */
/* SGD, PyTorch semantics:
 *   g = grad + wd * p;  buf = momentum * buf + g  (buf = g on the first step, first_step != 0)
 *   d = nesterov ? g + momentum * buf : buf;  p -= lr * d
 * buf may be NULL when momentum == 0. */
void ql_sgd_update(float *restrict p, float *restrict buf, const float *restrict grad, int64_t n,
                   float lr, float momentum, float weight_decay, int nesterov, int first_step);
/* AdamW (decoupled weight decay), PyTorch semantics, step t >= 1:
 *   p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) */
void ql_adamw_update(float *restrict p, float *restrict m, float *restrict v,
                     const float *restrict grad, int64_t n, float lr, float beta1, float beta2,
                     float eps, float weight_decay, int64_t step);

/* ------------------------------------------------------------------------------------------
 * Peak-rate probes (peak.c): one core's FP32 and INT8 multiply-add throughput with the
 * instructions the kernels use (AVX2: vfmadd231ps, and vpmaddubsw + vpmaddwd + vpaddd;
 * AVX-512: vfmadd231ps zmm, and VNNI vpdpbusd zmm). Their ratio bounds what INT8 can gain over
 * FP32 on this CPU per multiply. ql_peak_probe runs `iters` iterations on the calling thread
 * (the caller times it), sets *macs to the multiply-adds done and *check to the accumulators'
 * closed-form result, which ql_peak_expected gives (the reference). QL_EUNSUPPORTED for
 * QL_ISA_REF (no vector peak) or a level the CPU lacks.
 * ---------------------------------------------------------------------------------------- */
enum { QL_PEAK_FP32 = 0, QL_PEAK_INT8 = 1 };
int ql_peak_probe(ql_isa isa, int kind, long iters, double *macs, uint32_t *check);
uint32_t ql_peak_expected(ql_isa isa, int kind, long iters);

#ifdef __cplusplus
}
#endif
#endif /* QUANTLAB_CKERNELS_H */
