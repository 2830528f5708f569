// host_plugin.cpp — the plugin's ABI (cuda/include/qlcuda.h) implemented on the CPU, for tests
// on machines without a GPU. "Device" memory is host memory; each entry calls the C kernel
// the CUDA kernel is the twin of (ql_sgemm, ql_igemm_u8s8s32_ref + the epilogue references,
// ...); the engine's kernels run engine_ops.cuh's element functions, the code the CUDA kernels
// run. It checks nothing about CUDA: what it makes testable is the Swift side of the GPU path
// (CUDAPlan: slots, geometry, weight packing calls, offsets, layouts; CUDAOps; CUDABuffer),
// which otherwise runs only where a GPU is. `make gpu-emulated` runs the tests that use only
// the entries below (the rest of the table is NULL: the other conformance tests need a GPU).
// Built by scripts/build_cuda.sh into .build/cuda/host-check/libqlcuda-host.so.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include "engine_ops.cuh"
extern "C" {
#include "ckernels.h"
}

static thread_local char last_error_buf[256] = "";
static int fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error_buf, sizeof last_error_buf, fmt, ap);
    va_end(ap);
    return status;
}
static const char *last_error(void) { return last_error_buf; }

static int device_info(qlc_device_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->name, sizeof info->name, "host emulation of the plugin (CPU, no GPU)");
    info->sm_count = 1;
    info->total_memory = (size_t)1 << 30;
    return QLC_OK;
}
static int dmalloc(void **p, size_t bytes) { *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); return *p ? QLC_OK : fail(QLC_ECUDA, "out of memory"); }
static int dfree(void *p) { free(p); return QLC_OK; }
static int copy(void *d, const void *s, size_t n, qlc_stream) { memmove(d, s, n); return QLC_OK; }
static int dmemset(void *p, int v, size_t n, qlc_stream) { memset(p, v, n); return QLC_OK; }
static int sync_stream(qlc_stream) { return QLC_OK; }
static int sync_device(void) { return QLC_OK; }

static int sgemm(qlc_stream, int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc) {
    return ql_sgemm(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) == 0 ? QLC_OK : fail(QLC_EINVAL, "sgemm: bad sizes");
}
static int sgemm_ex(qlc_stream s, int, int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                    float beta, float *C, int ldc) {
    return sgemm(s, tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// "Packed" weights: B as it is, K x N row-major (the real plugin's layout is its own business).
static size_t igemm_packed_size(int K, int N) { return (size_t)K * N + 16; }
static int igemm_pack_b(qlc_stream, void *packed, int32_t *col_sum, const int8_t *B, int ldb, int K, int N) {
    if (K < 0 || N < 0 || ldb < (N > 1 ? N : 1)) return fail(QLC_EINVAL, "igemm_pack_b: inconsistent sizes");
    for (int k = 0; k < K; k++) memcpy((int8_t *)packed + (size_t)k * N, B + (size_t)k * ldb, (size_t)N);
    if (col_sum)
        for (int n = 0; n < N; n++) {
            int32_t s = 0;
            for (int k = 0; k < K; k++) s += B[(size_t)k * ldb + n];
            col_sum[n] = s;
        }
    return QLC_OK;
}
static int igemm_pack_b_offsets(qlc_stream s, void *packed, int32_t *col_offset, const int8_t *B, int ldb, int K, int N, int zero_point) {
    int st = igemm_pack_b(s, packed, col_offset, B, ldb, K, N);
    if (st == QLC_OK && col_offset)
        for (int n = 0; n < N; n++) col_offset[n] *= -zero_point;
    return st;
}
static int igemm_ex(qlc_stream, int kernel, int mode, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                    const qlc_requant_params *hp, void *out, int ldo) {
    if (M < 0 || N < 0 || K < 0 || lda < (K > 1 ? K : 1) || ldo < (N > 1 ? N : 1)) return fail(QLC_EINVAL, "igemm: inconsistent sizes");
    if (kernel != QLC_KERNEL_AUTO && kernel != QLC_IGEMM_DP4A && kernel != QLC_IGEMM_IMMA && kernel != QLC_IGEMM_IMMA_WIDE)
        return fail(QLC_EINVAL, "igemm: unknown kernel %d", kernel);
    if (mode != QLC_OUT_S32 && (!hp || !hp->scale)) return fail(QLC_EINVAL, "igemm: epilogue needs scale");
    std::vector<int32_t> acc((size_t)M * N);
    ql_igemm_u8s8s32_ref(M, N, K, A, lda, (const int8_t *)packed, N, acc.data(), N);
    if (mode == QLC_OUT_S32) {
        for (int i = 0; i < M; i++) memcpy((int32_t *)out + (size_t)i * ldo, acc.data() + (size_t)i * N, (size_t)N * 4);
        return QLC_OK;
    }
    if (mode == QLC_OUT_S8) return ql_requantize_s8_ref(M, N, (int8_t *)out, ldo, acc.data(), N, hp->col_offset, hp->scale, hp->bias, hp->relu) == 0 ? QLC_OK : fail(QLC_EINVAL, "requantize");
    if (mode == QLC_OUT_F32) return ql_dequantize_f32_ref(M, N, (float *)out, ldo, acc.data(), N, hp->col_offset, hp->scale, hp->bias, hp->relu) == 0 ? QLC_OK : fail(QLC_EINVAL, "dequantize");
    return fail(QLC_EINVAL, "igemm: unknown output type %d", mode);
}
static int igemm_s32(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *p, int32_t *C, int ldc) {
    return igemm_ex(s, QLC_KERNEL_AUTO, QLC_OUT_S32, M, N, K, A, lda, p, NULL, C, ldc);
}
static int igemm_s8(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *p, const qlc_requant_params *hp, int8_t *o, int ldo) {
    return igemm_ex(s, QLC_KERNEL_AUTO, QLC_OUT_S8, M, N, K, A, lda, p, hp, o, ldo);
}
static int igemm_f32(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *p, const qlc_requant_params *hp, float *o, int ldo) {
    return igemm_ex(s, QLC_KERNEL_AUTO, QLC_OUT_F32, M, N, K, A, lda, p, hp, o, ldo);
}

static int im2col(qlc_stream, float *col, const float *x, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW) {
    ql_im2col(col, x, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW);
    return QLC_OK;
}
static int unary_fwd(qlc_stream, int op, float *y, const float *x, int64_t n) { ql_unary_fwd((ql_unary_op)op, y, x, n); return QLC_OK; }
static int binary_strided(qlc_stream, int op, float *out, const float *a, const int64_t *sa, const float *b, const int64_t *sb, const int64_t *shape, int ndim) {
    return ql_binary_strided((ql_binary_op)op, out, a, sa, b, sb, shape, ndim) == 0 ? QLC_OK : fail(QLC_EINVAL, "binary_strided");
}
static int scale_shift(qlc_stream, float *y, const float *x, float a, float b, int64_t n) { ql_scale_shift(y, x, a, b, n); return QLC_OK; }
static int softmax_rows(qlc_stream, float *y, const float *x, int64_t rows, int cols) { ql_softmax_rows(y, x, rows, cols); return QLC_OK; }

// The engine's kernels: the element functions over every output element, with the real
// plugin's argument checks (engine.cu), so a bad call fails the same way.
static int q8_quantize(qlc_stream, int8_t *out, const float *x, int N, int C, int64_t HW, float amax) {
    if (N < 0 || C <= 0 || HW < 0) return fail(QLC_EINVAL, "q8_quantize: bad shape");
    int64_t total = (int64_t)N * C * HW;
    if (!(amax > 0.0f)) { memset(out, 0, (size_t)total); return QLC_OK; }
    for (int64_t t = 0; t < total; t++) out[t] = qlc_quantize_element(t, x, C, HW, amax / 127.0f, 127.0f);
    return QLC_OK;
}
static int q8_requantize(qlc_stream, int8_t *out, const int8_t *in, int64_t n, float scale_in, float amax_out) {
    if (n < 0) return fail(QLC_EINVAL, "q8_requantize: negative count");
    if (!(amax_out > 0.0f)) { memset(out, 0, (size_t)n); return QLC_OK; }
    for (int64_t i = 0; i < n; i++) out[i] = qlc_requantize_element(in[i], scale_in, amax_out / 127.0f, 127.0f);
    return QLC_OK;
}
static int q8_dequantize(qlc_stream, float *out, const int8_t *q, int N, int C, int64_t HW, float scale) {
    if (N < 0 || C <= 0 || HW < 0) return fail(QLC_EINVAL, "q8_dequantize: bad shape");
    for (int64_t t = 0, total = (int64_t)N * C * HW; t < total; t++) out[t] = qlc_dequantize_element(t, q, C, HW, scale);
    return QLC_OK;
}
static int q8_im2col(qlc_stream, uint8_t *col, const int8_t *x, const qlc_conv_geom *g, int offset) {
    int OH, OW;
    if (!qlc_conv_out(g, &OH, &OW) || (offset != 0 && offset != 128)) return fail(QLC_EINVAL, "q8_im2col: bad geometry or offset");
    for (int64_t t = 0, total = (int64_t)g->N * OH * OW * g->KH * g->KW * g->C; t < total; t++) col[t] = qlc_im2col_element(t, x, *g, OH, OW, offset);
    return QLC_OK;
}
static int q8_maxpool(qlc_stream, int8_t *out, const int8_t *x, int N, int H, int W, int C, int k, int stride, int pad) {
    int OH, OW;
    if (!qlc_pool_out(N, H, W, C, k, stride, pad, &OH, &OW)) return fail(QLC_EINVAL, "q8_maxpool: bad window or empty output");
    for (int64_t t = 0, total = (int64_t)N * OH * OW * C; t < total; t++) out[t] = qlc_maxpool_element(t, x, H, W, C, k, stride, pad, OH, OW);
    return QLC_OK;
}
static int concat_rows(qlc_stream, void *out, const void *const *inputs, const int64_t *row_bytes, int count, int64_t rows) {
    if (!inputs || !row_bytes || count < 1 || rows < 0) return fail(QLC_EINVAL, "concat_rows: bad arguments");
    int64_t total = 0;
    for (int i = 0; i < count; i++) {
        if (row_bytes[i] < 0) return fail(QLC_EINVAL, "concat_rows: input %d has rows of %lld bytes", i, (long long)row_bytes[i]);
        total += row_bytes[i];
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t at = 0;
        for (int i = 0; i < count; at += row_bytes[i], i++)
            memcpy((char *)out + r * total + at, (const char *)inputs[i] + r * row_bytes[i], (size_t)row_bytes[i]);
    }
    return QLC_OK;
}
static int copy_strided(qlc_stream, float *out, const float *in, const int64_t *in_strides, const int64_t *shape, int ndim) {
    if (ndim < 0 || ndim > QLC_MAX_DIMS) return fail(QLC_EINVAL, "copy_strided: ndim %d", ndim);
    int64_t total = 1;
    for (int d = 0; d < ndim; d++) total *= shape[d];
    for (int64_t t = 0; t < total; t++) out[t] = in[qlc_strided_source(t, in_strides, shape, ndim)];
    return QLC_OK;
}
static int scatter_blocks(qlc_stream, void *out, const void *gemm, int elem, int N, int H, int W, int KH, int KW, int K) {
    if (N < 0 || H <= 0 || W <= 0 || KH <= 0 || KW <= 0 || K <= 0) return fail(QLC_EINVAL, "scatter_blocks: bad shape");
    if (elem != 1 && elem != 4) return fail(QLC_EINVAL, "scatter_blocks: element size %d", elem);
    for (int64_t t = 0, total = (int64_t)N * H * KH * W * KW * K; t < total; t++)
        memcpy((char *)out + t * elem, (const char *)gemm + qlc_scatter_source(t, H, W, KH, KW, K) * elem, (size_t)elem);
    return QLC_OK;
}
static int nhwc_to_nchw(qlc_stream, float *out, const float *in, int N, int64_t HW, int C) {
    if (N < 0 || HW < 0 || C <= 0) return fail(QLC_EINVAL, "nhwc_to_nchw: bad shape");
    for (int64_t t = 0, total = (int64_t)N * HW * C; t < total; t++) out[t] = in[qlc_nhwc_source(t, HW, C)];
    return QLC_OK;
}

extern "C" __attribute__((visibility("default"))) const qlc_api *qlc_get_api(int abi_version) {
    static qlc_api api;
    static bool filled = false;
    if (abi_version != QLC_ABI_VERSION) return NULL;
    if (!filled) {
        memset(&api, 0, sizeof api);
        api.device_info = device_info;
        api.last_error = last_error;
        api.malloc = dmalloc;
        api.free = dfree;
        api.memcpy_h2d = copy;
        api.memcpy_d2h = copy;
        api.memcpy_d2d = copy;
        api.memset = dmemset;
        api.stream_synchronize = sync_stream;
        api.device_synchronize = sync_device;
        api.sgemm = sgemm;
        api.sgemm_ex = sgemm_ex;
        api.igemm_packed_size = igemm_packed_size;
        api.igemm_pack_b = igemm_pack_b;
        api.igemm_pack_b_offsets = igemm_pack_b_offsets;
        api.igemm_u8s8s32 = igemm_s32;
        api.igemm_u8s8_s8 = igemm_s8;
        api.igemm_u8s8_f32 = igemm_f32;
        api.igemm_ex = igemm_ex;
        api.im2col = im2col;
        api.unary_fwd = unary_fwd;
        api.binary_strided = binary_strided;
        api.scale_shift = scale_shift;
        api.softmax_rows = softmax_rows;
        api.q8_quantize_nchw_to_nhwc = q8_quantize;
        api.q8_requantize = q8_requantize;
        api.q8_dequantize_nhwc_to_nchw = q8_dequantize;
        api.q8_im2col_nhwc = q8_im2col;
        api.q8_maxpool_nhwc = q8_maxpool;
        api.concat_rows = concat_rows;
        api.copy_strided = copy_strided;
        api.scatter_blocks_nhwc = scatter_blocks;
        api.nhwc_to_nchw_f32 = nhwc_to_nchw;
        filled = true;
    }
    return &api;
}
