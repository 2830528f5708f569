// conv_quant.cu — im2col, fake quantization (fwd/bwd, per tensor and per channel) and the
// calibration reductions (per-channel amax, |x| histogram). Twins of ql_im2col,
// ql_fake_quant_*, ql_channel_absmax_f32 and ql_histogram_abs_f32.
//
// Versions: one each. im2col: one thread per col element (reads are gathered, writes
// coalesced). amax: grid-stride max per thread, warp shuffle reduce, one atomicMax per warp on
// the float's bit pattern (valid because |x| >= 0 orders like its bits). Histogram: one
// atomicAdd per element into global memory (calibration is not a hot path).
#include "common.cuh"

__global__ void im2col_kernel(float *col, const float *x, int C, int H, int W, int KH, int KW, int SH, int SW,
                              int PH, int PW, int DH, int DW, int OH, int OW) {
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, total = (int64_t)C * KH * KW * OH * OW;
    if (t >= total) return;
    int ow = (int)(t % OW), oh = (int)(t / OW % OH);
    int64_t row = t / ((int64_t)OH * OW);
    int kw = (int)(row % KW), kh = (int)(row / KW % KH), c = (int)(row / ((int64_t)KW * KH));
    int ih = oh * SH - PH + kh * DH, iw = ow * SW - PW + kw * DW;
    col[t] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[((size_t)c * H + ih) * W + iw] : 0.0f;
}

static int im2col(qlc_stream s, float *col, const float *x, int C, int H, int W, int KH, int KW, int SH, int SW,
                  int PH, int PW, int DH, int DW) {
    if (C <= 0 || H <= 0 || W <= 0 || KH <= 0 || KW <= 0 || SH <= 0 || SW <= 0 || PH < 0 || PW < 0 || DH <= 0 || DW <= 0)
        return qlc_fail(QLC_EINVAL, "im2col: bad geometry");
    int OH = (H + 2 * PH - DH * (KH - 1) - 1) / SH + 1, OW = (W + 2 * PW - DW * (KW - 1) - 1) / SW + 1;
    if (OH <= 0 || OW <= 0) return qlc_fail(QLC_EINVAL, "im2col: empty output");
    int64_t total = (int64_t)C * KH * KW * OH * OW;
    im2col_kernel<<<blocks_for(total, 256), 256, 0, as_stream(s)>>>(col, x, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW);
    return qlc_check_launch("im2col");
}

// y = clamp(rint(x / s), -qmax, qmax) * s; rintf rounds half to even, / is IEEE division.
__device__ __forceinline__ float fq(float x, float amax, int qmax) {
    if (!(amax > 0.0f)) return 0.0f;
    float s = amax / (float)qmax, lim = (float)qmax;
    float q = rintf(__fdiv_rn(x, s));
    q = q > lim ? lim : (q < -lim ? -lim : q);
    return __fmul_rn(q, s);
}

__global__ void fake_quant_kernel(float *y, const float *x, int64_t n, float amax, int qmax) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = fq(x[i], amax, qmax);
}

__global__ void fake_quant_pc_kernel(float *y, const float *x, int64_t total, int channels, int64_t inner,
                                     const float *amax, int qmax) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = fq(x[i], amax[(i / inner) % channels], qmax);
}

__global__ void fake_quant_bwd_kernel(float *dx, const float *dy, const float *x, int64_t n, float amax) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dx[i] += fabsf(x[i]) <= amax ? dy[i] : 0.0f;
}

__global__ void fake_quant_pc_bwd_kernel(float *dx, const float *dy, const float *x, int64_t total, int channels,
                                         int64_t inner, const float *amax) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
        dx[i] += fabsf(x[i]) <= amax[(i / inner) % channels] ? dy[i] : 0.0f;
}


static int fake_quant(qlc_stream s, float *y, const float *x, int64_t n, float amax, int qmax) {
    if (n < 0 || qmax <= 0) return qlc_fail(QLC_EINVAL, "fake_quant: n %lld, qmax %d", (long long)n, qmax);
    if (n == 0) return QLC_OK;
    fake_quant_kernel<<<grid(n), 256, 0, as_stream(s)>>>(y, x, n, amax, qmax);
    return qlc_check_launch("fake_quant");
}
static int fake_quant_pc(qlc_stream s, float *y, const float *x, int64_t outer, int channels, int64_t inner,
                         const float *amax, int qmax) {
    int64_t total = outer * channels * inner;
    if (outer < 0 || channels <= 0 || inner < 0 || qmax <= 0) return qlc_fail(QLC_EINVAL, "fake_quant_per_channel: bad sizes");
    if (total == 0) return QLC_OK;
    fake_quant_pc_kernel<<<grid(total), 256, 0, as_stream(s)>>>(y, x, total, channels, inner, amax, qmax);
    return qlc_check_launch("fake_quant_per_channel");
}
static int fake_quant_bwd(qlc_stream s, float *dx, const float *dy, const float *x, int64_t n, float amax) {
    if (n < 0) return qlc_fail(QLC_EINVAL, "fake_quant_bwd: n < 0");
    if (n == 0) return QLC_OK;
    fake_quant_bwd_kernel<<<grid(n), 256, 0, as_stream(s)>>>(dx, dy, x, n, amax);
    return qlc_check_launch("fake_quant_bwd");
}
static int fake_quant_pc_bwd(qlc_stream s, float *dx, const float *dy, const float *x, int64_t outer, int channels,
                             int64_t inner, const float *amax) {
    int64_t total = outer * channels * inner;
    if (outer < 0 || channels <= 0 || inner < 0) return qlc_fail(QLC_EINVAL, "fake_quant_per_channel_bwd: bad sizes");
    if (total == 0) return QLC_OK;
    fake_quant_pc_bwd_kernel<<<grid(total), 256, 0, as_stream(s)>>>(dx, dy, x, total, channels, inner, amax);
    return qlc_check_launch("fake_quant_per_channel_bwd");
}

// One block per (channel, slice of outer); |x| max by grid-stride loop and warp shuffles.
__global__ void channel_absmax_kernel(float *amax, const float *x, int64_t outer, int channels, int64_t inner) {
    int c = blockIdx.y;
    float m = 0.0f;
    int64_t per_channel = outer * inner;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < per_channel; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = t / inner, i = t % inner;
        m = fmaxf(m, fabsf(x[(o * channels + c) * inner + i]));
    }
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_down_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0) atomicMax((int *)&amax[c], __float_as_int(m));
}

static int channel_absmax(qlc_stream s, float *amax, const float *x, int64_t outer, int channels, int64_t inner) {
    if (outer < 0 || channels <= 0 || inner < 0) return qlc_fail(QLC_EINVAL, "channel_absmax: bad sizes");
    QLC_TRY(cudaMemsetAsync(amax, 0, sizeof(float) * channels, as_stream(s)));
    int64_t per = outer * inner;
    if (per == 0) return QLC_OK;
    unsigned gx = blocks_for(per, 256);
    if (gx > 256) gx = 256;
    channel_absmax_kernel<<<dim3(gx, channels), 256, 0, as_stream(s)>>>(amax, x, outer, channels, inner);
    return qlc_check_launch("channel_absmax");
}

__global__ void histogram_kernel(unsigned long long *counts, int bins, const float *x, int64_t n, float range) {
    float scale = (float)bins / range;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float a = fabsf(x[i]);
        int b = a >= range ? bins - 1 : (int)__fmul_rn(a, scale);
        if (b >= bins) b = bins - 1;
        if (b < 0 || a != a) b = 0;
        atomicAdd(&counts[b], 1ULL);
    }
}

static int histogram_abs(qlc_stream s, int64_t *counts, int bins, const float *x, int64_t n, float range) {
    if (bins <= 0 || !(range > 0.0f) || n < 0) return qlc_fail(QLC_EINVAL, "histogram_abs: bins %d, range %g", bins, range);
    if (n == 0) return QLC_OK;
    histogram_kernel<<<grid(n), 256, 0, as_stream(s)>>>((unsigned long long *)counts, bins, x, n, range);
    return qlc_check_launch("histogram_abs");
}

void qlc_fill_conv_quant(qlc_api *api) {
    api->im2col = im2col;
    api->fake_quant = fake_quant;
    api->fake_quant_per_channel = fake_quant_pc;
    api->fake_quant_bwd = fake_quant_bwd;
    api->fake_quant_per_channel_bwd = fake_quant_pc_bwd;
    api->channel_absmax = channel_absmax;
    api->histogram_abs = histogram_abs;
}
