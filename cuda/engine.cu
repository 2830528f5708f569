// engine.cu — the INT8 engine's activation kernels, for a plan run on the GPU
// (Sources/QuantLabEngine/CUDAPlan.swift): NHWC int8 codes from and to floats, requantization,
// the int8 im2col, max pooling, a transposed conv's scatter, NHWC -> NCHW; and two copies
// that tensors on the device use too: concatenation (codes along channels, floats along any
// axis) and the strided copy behind permute and slice. GPU twins of qtensor.c, bit-exact: each thread computes one output element
// with engine_ops.cuh, which cuda/check/engine_ops_host.cpp also runs on the host against
// the C kernels.
//
// Versions: one each, a grid-stride loop of one element per thread (these steps move bytes;
// the engine's maps are small). Concatenation is one strided 2-D copy per input.
#include "common.cuh"
#include "engine_ops.cuh"

#define FOR_EACH_ELEMENT(t, total) \
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < (total); t += (int64_t)gridDim.x * blockDim.x)

__global__ void quantize_kernel(int8_t *out, const float *x, int C, int64_t HW, int64_t total, float s) {
    FOR_EACH_ELEMENT(t, total) out[t] = qlc_quantize_element(t, x, C, HW, s, 127.0f);
}

static int q8_quantize_nchw_to_nhwc(qlc_stream st, int8_t *out, const float *x, int N, int C, int64_t HW, float amax) {
    if (N < 0 || C <= 0 || HW < 0) return qlc_fail(QLC_EINVAL, "q8_quantize: bad shape N %d C %d HW %lld", N, C, (long long)HW);
    int64_t total = (int64_t)N * C * HW;
    if (total == 0) return QLC_OK;
    if (!(amax > 0.0f)) { QLC_TRY(cudaMemsetAsync(out, 0, (size_t)total, as_stream(st))); return QLC_OK; }
    quantize_kernel<<<grid(total), 256, 0, as_stream(st)>>>(out, x, C, HW, total, amax / 127.0f); // s as the CPU's amax / (float)qmax
    return qlc_check_launch("q8_quantize");
}

__global__ void requantize_kernel(int8_t *out, const int8_t *in, int64_t n, float scale_in, float s) {
    FOR_EACH_ELEMENT(i, n) out[i] = qlc_requantize_element(in[i], scale_in, s, 127.0f);
}

static int q8_requantize(qlc_stream st, int8_t *out, const int8_t *in, int64_t n, float scale_in, float amax_out) {
    if (n < 0) return qlc_fail(QLC_EINVAL, "q8_requantize: negative count");
    if (n == 0) return QLC_OK;
    if (!(amax_out > 0.0f)) { QLC_TRY(cudaMemsetAsync(out, 0, (size_t)n, as_stream(st))); return QLC_OK; }
    requantize_kernel<<<grid(n), 256, 0, as_stream(st)>>>(out, in, n, scale_in, amax_out / 127.0f);
    return qlc_check_launch("q8_requantize");
}

__global__ void dequantize_kernel(float *out, const int8_t *q, int C, int64_t HW, int64_t total, float scale) {
    FOR_EACH_ELEMENT(t, total) out[t] = qlc_dequantize_element(t, q, C, HW, scale);
}

static int q8_dequantize_nhwc_to_nchw(qlc_stream st, float *out, const int8_t *q, int N, int C, int64_t HW, float scale) {
    if (N < 0 || C <= 0 || HW < 0) return qlc_fail(QLC_EINVAL, "q8_dequantize: bad shape");
    int64_t total = (int64_t)N * C * HW;
    if (total == 0) return QLC_OK;
    dequantize_kernel<<<grid(total), 256, 0, as_stream(st)>>>(out, q, C, HW, total, scale);
    return qlc_check_launch("q8_dequantize");
}

__global__ void im2col_nhwc_kernel(uint8_t *col, const int8_t *x, qlc_conv_geom g, int OH, int OW, int offset, int64_t total) {
    FOR_EACH_ELEMENT(t, total) col[t] = qlc_im2col_element(t, x, g, OH, OW, offset);
}

static int q8_im2col_nhwc(qlc_stream st, uint8_t *col, const int8_t *x, const qlc_conv_geom *g, int offset) {
    int OH, OW;
    if (!qlc_conv_out(g, &OH, &OW) || (offset != 0 && offset != 128)) return qlc_fail(QLC_EINVAL, "q8_im2col: bad geometry or offset %d", offset);
    int64_t total = (int64_t)g->N * OH * OW * g->KH * g->KW * g->C;
    if (total == 0) return QLC_OK;
    im2col_nhwc_kernel<<<grid(total), 256, 0, as_stream(st)>>>(col, x, *g, OH, OW, offset, total);
    return qlc_check_launch("q8_im2col");
}

__global__ void maxpool_nhwc_kernel(int8_t *out, const int8_t *x, int H, int W, int C, int k, int stride, int pad, int OH, int OW, int64_t total) {
    FOR_EACH_ELEMENT(t, total) out[t] = qlc_maxpool_element(t, x, H, W, C, k, stride, pad, OH, OW);
}

static int q8_maxpool_nhwc(qlc_stream st, int8_t *out, const int8_t *x, int N, int H, int W, int C, int k, int stride, int pad) {
    int OH, OW;
    if (!qlc_pool_out(N, H, W, C, k, stride, pad, &OH, &OW)) return qlc_fail(QLC_EINVAL, "q8_maxpool: bad window or empty output");
    int64_t total = (int64_t)N * OH * OW * C;
    if (total == 0) return QLC_OK;
    maxpool_nhwc_kernel<<<grid(total), 256, 0, as_stream(st)>>>(out, x, H, W, C, k, stride, pad, OH, OW, total);
    return qlc_check_launch("q8_maxpool");
}

// Each input's rows copied to its offset in rows of the total: one strided 2-D copy per input.
static int concat_rows(qlc_stream st, void *out, const void *const *inputs, const int64_t *row_bytes, int count, int64_t rows) {
    if (!inputs || !row_bytes || count < 1 || rows < 0) return qlc_fail(QLC_EINVAL, "concat_rows: bad arguments");
    int64_t total = 0;
    for (int i = 0; i < count; i++) {
        if (row_bytes[i] < 0) return qlc_fail(QLC_EINVAL, "concat_rows: input %d has rows of %lld bytes", i, (long long)row_bytes[i]);
        total += row_bytes[i];
    }
    if (rows == 0 || total == 0) return QLC_OK;
    int64_t at = 0;
    for (int i = 0; i < count; at += row_bytes[i], i++)
        if (row_bytes[i] > 0)
            QLC_TRY(cudaMemcpy2DAsync((char *)out + at, (size_t)total, inputs[i], (size_t)row_bytes[i], (size_t)row_bytes[i], (size_t)rows,
                                      cudaMemcpyDeviceToDevice, as_stream(st)));
    return QLC_OK;
}

struct StridedView {
    int ndim;
    int64_t strides[QLC_MAX_DIMS], shape[QLC_MAX_DIMS];
};

__global__ void copy_strided_kernel(float *out, const float *in, StridedView v, int64_t total) {
    FOR_EACH_ELEMENT(t, total) out[t] = in[qlc_strided_source(t, v.strides, v.shape, v.ndim)];
}

static int copy_strided(qlc_stream st, float *out, const float *in, const int64_t *in_strides, const int64_t *shape, int ndim) {
    if (ndim < 0 || ndim > QLC_MAX_DIMS || (ndim > 0 && (!in_strides || !shape))) return qlc_fail(QLC_EINVAL, "copy_strided: ndim %d", ndim);
    StridedView v;
    v.ndim = ndim;
    int64_t total = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return qlc_fail(QLC_EINVAL, "copy_strided: negative dim");
        v.shape[d] = shape[d];
        v.strides[d] = in_strides[d];
        total *= shape[d];
    }
    if (total == 0) return QLC_OK;
    copy_strided_kernel<<<grid(total), 256, 0, as_stream(st)>>>(out, in, v, total);
    return qlc_check_launch("copy_strided");
}

template <typename T>
__global__ void scatter_blocks_kernel(T *out, const T *gemm, int H, int W, int KH, int KW, int K, int64_t total) {
    FOR_EACH_ELEMENT(t, total) out[t] = gemm[qlc_scatter_source(t, H, W, KH, KW, K)];
}

static int scatter_blocks_nhwc(qlc_stream st, void *out, const void *gemm, int elem_size, int N, int H, int W, int KH, int KW, int K) {
    if (N < 0 || H <= 0 || W <= 0 || KH <= 0 || KW <= 0 || K <= 0) return qlc_fail(QLC_EINVAL, "scatter_blocks: bad shape");
    if (elem_size != 1 && elem_size != 4) return qlc_fail(QLC_EINVAL, "scatter_blocks: element size %d (1 or 4)", elem_size);
    int64_t total = (int64_t)N * H * KH * W * KW * K;
    if (total == 0) return QLC_OK;
    if (elem_size == 1)
        scatter_blocks_kernel<int8_t><<<grid(total), 256, 0, as_stream(st)>>>((int8_t *)out, (const int8_t *)gemm, H, W, KH, KW, K, total);
    else
        scatter_blocks_kernel<float><<<grid(total), 256, 0, as_stream(st)>>>((float *)out, (const float *)gemm, H, W, KH, KW, K, total);
    return qlc_check_launch("scatter_blocks");
}

__global__ void nhwc_to_nchw_kernel(float *out, const float *in, int64_t HW, int C, int64_t total) {
    FOR_EACH_ELEMENT(t, total) out[t] = in[qlc_nhwc_source(t, HW, C)];
}

static int nhwc_to_nchw_f32(qlc_stream st, float *out, const float *in, int N, int64_t HW, int C) {
    if (N < 0 || HW < 0 || C <= 0) return qlc_fail(QLC_EINVAL, "nhwc_to_nchw: bad shape");
    int64_t total = (int64_t)N * HW * C;
    if (total == 0) return QLC_OK;
    nhwc_to_nchw_kernel<<<grid(total), 256, 0, as_stream(st)>>>(out, in, HW, C, total);
    return qlc_check_launch("nhwc_to_nchw");
}

void qlc_fill_engine(qlc_api *api) {
    api->q8_quantize_nchw_to_nhwc = q8_quantize_nchw_to_nhwc;
    api->q8_requantize = q8_requantize;
    api->q8_dequantize_nhwc_to_nchw = q8_dequantize_nhwc_to_nchw;
    api->q8_im2col_nhwc = q8_im2col_nhwc;
    api->q8_maxpool_nhwc = q8_maxpool_nhwc;
    api->concat_rows = concat_rows;
    api->copy_strided = copy_strided;
    api->scatter_blocks_nhwc = scatter_blocks_nhwc;
    api->nhwc_to_nchw_f32 = nhwc_to_nchw_f32;
}
