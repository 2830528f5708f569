/*
 * qlcuda.h — the CUDA plugin's C ABI: GPU twins of the kernels in ckernels.h.
 *
 * The plugin (libqlcuda.so, built by `make cuda`) is opened at run time with dlopen, so the
 * Swift build never needs CUDA. It exports ONE symbol, qlc_get_api(QLC_ABI_VERSION), which
 * returns a table of function pointers (or NULL for a version mismatch); this header is
 * the only thing both sides share.
 *
 * Conventions, as in ckernels.h, plus:
 *   - Every pointer argument of a kernel is DEVICE memory, except where marked (host).
 *   - Every call returns a status: QLC_OK (0) or a negative QLC_E* code; qlc_last_error()
 *     describes the last failure of the calling thread.
 *   - Kernels are enqueued on `stream` (NULL = the default stream) and return without
 *     waiting; synchronise (stream_synchronize) before reading results on the host.
 *   - Each kernel's result matches its CPU `_ref` twin: |gpu - ref| <= atol + rtol*|ref|
 *     with the tolerance stated in ckernels.h for float kernels, and bit-exactly for integer
 *     kernels and the requantization epilogue (which uses fmaf and round-half-to-even
 *     __float2int_rn, like the CPU).
 */
#ifndef QUANTLAB_QLCUDA_H
#define QUANTLAB_QLCUDA_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QLC_ABI_VERSION 3

enum {
    QLC_OK = 0,
    QLC_EINVAL = -1,       /* bad size or argument */
    QLC_ENODEVICE = -10,   /* no CUDA device, or no driver (cudaErrorInsufficientDriver) */
    QLC_ECUDA = -11,       /* a CUDA runtime error; see qlc_last_error */
    QLC_EUNAVAILABLE = -12 /* optional library missing (nvJPEG) */
};

/* Kernel choice for sgemm_ex / igemm_ex: AUTO picks what the plain entry points use. */
enum {
    QLC_KERNEL_AUTO = 0,
    QLC_SGEMM_NAIVE = 1,  /* one thread per output: the spec */
    QLC_SGEMM_TILED = 2,  /* 64x64 shared-memory tiles, 4x4 per thread */
    QLC_SGEMM_REG128 = 3, /* 128x128 tiles, 8x8 per thread, double-buffered (AUTO above tiny sizes) */
    QLC_IGEMM_DP4A = 11,  /* dp4a, any sm_61+ (AUTO below sm_80) */
    QLC_IGEMM_IMMA = 12,  /* tensor cores, mma.sync m16n8k32 u8 x s8, 128x128 tiles (AUTO on sm_80+) */
    QLC_IGEMM_IMMA_WIDE = 13 /* the same with 128x256 tiles and 3 stages */
};
/* Output of igemm_ex: exact int32, requantized int8, or dequantized float. */
enum { QLC_OUT_S32 = 0, QLC_OUT_S8 = 1, QLC_OUT_F32 = 2 };

typedef void *qlc_stream;
typedef void *qlc_event;
typedef void *qlc_jpeg_decoder;

typedef struct {
    char name[256];
    int sm_count;
    int cc_major, cc_minor;
    size_t total_memory;
    int driver_version, runtime_version;
} qlc_device_info;

/* Requantization epilogue parameters (device pointers), as ql_requant_params. */
typedef struct {
    const int32_t *col_offset; /* N or NULL */
    const float *scale;        /* N */
    const float *bias;         /* N or NULL */
    int relu;
} qlc_requant_params;

/* A convolution's geometry, as ckernels.h's ql_conv_geom (host memory). */
typedef struct {
    int N, C, H, W, K, KH, KW, SH, SW, PH, PW, DH, DW, groups;
} qlc_conv_geom;

#define QLC_MAX_DIMS 8

typedef struct {
    /* ---- runtime ------------------------------------------------------------------------ */
    /* Probes the driver and device 0. QLC_ENODEVICE when there is none (the normal case on a
     * CPU-only machine); info is filled when QLC_OK. */
    int (*device_info)(qlc_device_info *info);
    const char *(*last_error)(void);
    int (*malloc)(void **ptr, size_t bytes);
    int (*free)(void *ptr);
    int (*memcpy_h2d)(void *dst, const void *host_src, size_t bytes, qlc_stream stream);
    int (*memcpy_d2h)(void *host_dst, const void *src, size_t bytes, qlc_stream stream);
    int (*memcpy_d2d)(void *dst, const void *src, size_t bytes, qlc_stream stream);
    int (*memset)(void *ptr, int value, size_t bytes, qlc_stream stream);
    int (*stream_create)(qlc_stream *stream);
    int (*stream_destroy)(qlc_stream stream);
    int (*stream_synchronize)(qlc_stream stream);
    int (*device_synchronize)(void);
    int (*event_create)(qlc_event *event);
    int (*event_destroy)(qlc_event event);
    int (*event_record)(qlc_event event, qlc_stream stream);
    /* Milliseconds between two recorded events (waits for `end`). */
    int (*event_elapsed_ms)(float *ms, qlc_event start, qlc_event end);

    /* ---- GEMM ----------------------------------------------------------------------------- */
    /* ql_sgemm's contract (row-major, transposes, alpha/beta, beta == 0 never reads C). */
    int (*sgemm)(qlc_stream s, int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
    /* sgemm with the kernel named (QLC_SGEMM_*); QLC_EINVAL for an unknown one. */
    int (*sgemm_ex)(qlc_stream s, int kernel, int transA, int transB, int M, int N, int K, float alpha,
                    const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
    /* INT8: B (K x N int8, row-major) is packed once into the GPU layout (N x Kp, Kp = K
     * rounded up to 32, zero-padded: each column's weights contiguous, as mma's col operand
     * and dp4a's words want); size in bytes from igemm_packed_size; the buffer must be
     * 16-byte aligned (cudaMalloc's are). col_sum (N, may be NULL) = sum_k B[k, n]. */
    size_t (*igemm_packed_size)(int K, int N);
    int (*igemm_pack_b)(qlc_stream s, void *packed, int32_t *col_sum, const int8_t *B, int ldb, int K, int N);
    /* C = A (u8, M x K) x B (s8) in exact int32; as ql_igemm_u8s8s32. */
    int (*igemm_u8s8s32)(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                         int32_t *C, int ldc);
    /* Fused with the requantization epilogue; as ql_igemm_u8s8_s8 / ql_igemm_u8s8_f32. */
    int (*igemm_u8s8_s8)(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                         const qlc_requant_params *host_params, int8_t *out, int ldo);
    int (*igemm_u8s8_f32)(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                          const qlc_requant_params *host_params, float *out, int ldo);
    /* Any of the three with the kernel named (QLC_IGEMM_*) and the output type QLC_OUT_*;
     * QLC_EUNAVAILABLE for the tensor-core kernel below sm_80. host_params may be NULL for
     * QLC_OUT_S32. */
    int (*igemm_ex)(qlc_stream s, int kernel, int out_type, int M, int N, int K, const uint8_t *A, int lda,
                    const void *packed, const qlc_requant_params *host_params, void *out, int ldo);
    int (*requantize_s8)(qlc_stream s, int M, int N, int8_t *out, int ldo, const int32_t *acc, int ldacc,
                         const qlc_requant_params *host_params);
    int (*dequantize_f32)(qlc_stream s, int M, int N, float *out, int ldo, const int32_t *acc, int ldacc,
                          const qlc_requant_params *host_params);

    /* ---- convolution ---------------------------------------------------------------------- */
    /* ql_im2col for one image and channel group. */
    int (*im2col)(qlc_stream s, float *col, const float *x, int C, int H, int W, int KH, int KW, int SH,
                  int SW, int PH, int PW, int DH, int DW);

    /* ---- quantization ---------------------------------------------------------------------- */
    int (*fake_quant)(qlc_stream s, float *y, const float *x, int64_t n, float amax, int qmax);
    /* amax: device array of `channels` floats. */
    int (*fake_quant_per_channel)(qlc_stream s, float *y, const float *x, int64_t outer, int channels,
                                  int64_t inner, const float *amax, int qmax);
    int (*fake_quant_bwd)(qlc_stream s, float *dx, const float *dy, const float *x, int64_t n, float amax);
    int (*fake_quant_per_channel_bwd)(qlc_stream s, float *dx, const float *dy, const float *x, int64_t outer,
                                      int channels, int64_t inner, const float *amax);
    /* amax: device, `channels` floats (overwritten). */
    int (*channel_absmax)(qlc_stream s, float *amax, const float *x, int64_t outer, int channels, int64_t inner);
    /* counts: device, `bins` int64 (accumulated, as ql_histogram_abs_f32). */
    int (*histogram_abs)(qlc_stream s, int64_t *counts, int bins, const float *x, int64_t n, float range);

    /* ---- elementwise (ql_unary_op / ql_binary_op codes) ------------------------------------- */
    int (*unary_fwd)(qlc_stream s, int op, float *y, const float *x, int64_t n);
    int (*unary_bwd)(qlc_stream s, int op, float *dx, const float *dy, const float *x, const float *y, int64_t n);
    /* a_strides, b_strides, shape: HOST arrays of ndim <= QLC_MAX_DIMS entries. */
    int (*binary_strided)(qlc_stream s, int op, float *out, const float *a, const int64_t *a_strides,
                          const float *b, const int64_t *b_strides, const int64_t *shape, int ndim);
    int (*axpy)(qlc_stream s, float *y, float a, const float *x, int64_t n);
    int (*scale_shift)(qlc_stream s, float *y, const float *x, float a, float b, int64_t n);
    int (*softmax_rows)(qlc_stream s, float *y, const float *x, int64_t rows, int cols);
    int (*sgd_update)(qlc_stream s, float *p, float *buf, const float *grad, int64_t n, float lr, float momentum,
                      float weight_decay, int nesterov, int first_step);
    int (*adamw_update)(qlc_stream s, float *p, float *m, float *v, const float *grad, int64_t n, float lr,
                        float beta1, float beta2, float eps, float weight_decay, int64_t step);

    /* ---- preprocessing (the DALI-style pipeline) ------------------------------------------- */
    int (*resize_bilinear_u8)(qlc_stream s, uint8_t *out, int out_h, int out_w, const uint8_t *in, int in_h,
                              int in_w, int channels);
    /* scale, shift: HOST arrays of 3 floats. */
    int (*u8hwc_to_f32chw)(qlc_stream s, float *out, const uint8_t *in, int h, int w, const float *scale,
                           const float *shift, int flip);
    /* nvJPEG (opened at run time; QLC_EUNAVAILABLE without libnvjpeg). decode writes RGB HWC
     * into a device buffer of capacity bytes; width/height are host outputs. */
    int (*jpeg_decoder_create)(qlc_jpeg_decoder *decoder);
    int (*jpeg_decoder_destroy)(qlc_jpeg_decoder decoder);
    int (*jpeg_decode)(qlc_jpeg_decoder decoder, qlc_stream s, const uint8_t *host_data, size_t size,
                       uint8_t *rgb, size_t capacity, int *width, int *height);

    /* ---- the benchmark peer: cuBLAS, opened at run time ----------------------------------- */
    /* Opens cuBLAS ($QL_CUBLAS, then libcublas.so.13/.12/.11/.so); writes what was found (or
     * why not) into description (host, may be NULL). QLC_EUNAVAILABLE without it. */
    int (*cublas_open)(char *description, int capacity);
    /* Row-major C (M x N) = A (M x K) B (K x N), FP32, no TF32 (cuBLAS's default math). */
    int (*cublas_sgemm)(qlc_stream s, int M, int N, int K, const float *A, const float *B, float *C);
    /* Row-major C (M x N, int32) = A (M x K, s8) Bt^T, Bt (N x K, s8): cublasGemmEx with
     * 32-bit integer compute; K and N multiples of 4. */
    int (*cublas_igemm)(qlc_stream s, int M, int N, int K, const int8_t *A, const int8_t *Bt, int32_t *C);

    /* ---- the INT8 engine's activations (engine.cu; twins of qtensor.c, bit-exact) ---------- */
    /* NHWC int8 codes at scale amax / 127: code = clamp(round_half_to_even(x / s), -127, 127),
     * all zeros when amax <= 0. From N images of C x HW floats (NCHW); C = 1, N = 1 quantizes
     * a flat array. */
    int (*q8_quantize_nchw_to_nhwc)(qlc_stream s, int8_t *out, const float *x, int N, int C, int64_t HW, float amax);
    /* out = code(in * scale_in) at amax_out: the simulator's value, quantized again. */
    int (*q8_requantize)(qlc_stream s, int8_t *out, const int8_t *in, int64_t n, float scale_in, float amax_out);
    /* NHWC codes to NCHW floats code * scale. */
    int (*q8_dequantize_nhwc_to_nchw)(qlc_stream s, float *out, const int8_t *q, int N, int C, int64_t HW, float scale);
    /* The im2col of NHWC codes: one row per output pixel, (kh, kw, c) along it, each byte
     * code + offset (offset 0 or 128; padding is the code 0, so `offset`). g: HOST, groups 1. */
    int (*q8_im2col_nhwc)(qlc_stream s, uint8_t *col, const int8_t *x, const qlc_conv_geom *g, int offset);
    /* Max pooling of NHWC codes (padding never wins), pad <= k / 2. */
    int (*q8_maxpool_nhwc)(qlc_stream s, int8_t *out, const int8_t *x, int N, int H, int W, int C, int k, int stride, int pad);
    /* Rows side by side: input i is `rows` rows of row_bytes[i] bytes each; output row r is the
     * inputs' rows r one after another. The concatenation of NHWC codes along channels (rows =
     * pixels) and of float tensors along any axis (rows = the product of the dims before it).
     * inputs (device pointers) and row_bytes: HOST arrays of count. */
    int (*concat_rows)(qlc_stream s, void *out, const void *const *inputs, const int64_t *row_bytes, int count, int64_t rows);
    /* out[dense index over shape] = in[strided index], as ql_copy_strided: permute, slice.
     * in_strides, shape: HOST arrays of ndim <= QLC_MAX_DIMS. */
    int (*copy_strided)(qlc_stream s, float *out, const float *in, const int64_t *in_strides, const int64_t *shape, int ndim);
    /* A transposed conv's GEMM rows [pixel (n, h, w)][(i, j, k)] (elements of elem_size 1 or
     * 4 bytes) to NHWC [N, H*KH, W*KW, K]: each pixel's KH x KW block to its place. */
    int (*scatter_blocks_nhwc)(qlc_stream s, void *out, const void *gemm, int elem_size, int N, int H, int W, int KH, int KW, int K);
    /* igemm_pack_b with col_offset[n] = -zero_point * sum_k B[k, n] (device, N) in place of
     * the sums: the epilogue's offsets when A holds codes + zero_point as u8 (operand B an
     * activation, packed at every run: attention's products). */
    int (*igemm_pack_b_offsets)(qlc_stream s, void *packed, int32_t *col_offset, const int8_t *B, int ldb, int K, int N, int zero_point);
    /* Floats NHWC [N, HW, C] to NCHW [N, C, HW]. */
    int (*nhwc_to_nchw_f32)(qlc_stream s, float *out, const float *in, int N, int64_t HW, int C);
} qlc_api;

/* The plugin's only exported symbol. */
const qlc_api *qlc_get_api(int abi_version);
typedef const qlc_api *(*qlc_get_api_fn)(int abi_version);

#ifdef __cplusplus
}
#endif
#endif
