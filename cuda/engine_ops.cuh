// engine_ops.cuh — what each thread of the INT8 engine's kernels (engine.cu) and of the INT8
// epilogue's SiLU (igemm.cu) computes: one output element, as a function of its index.
//
// Host and device code: nvcc compiles them into the kernels, and cuda/check/engine_ops_host.cpp
// compiles them with g++ to compare every element with the CPU kernels (qtensor.c, the
// epilogue's ql_requantize_s8_ref) on a machine without a GPU (`make cuda` runs it). The float
// steps are the C code's, one correctly rounded IEEE operation each: on the device the
// explicit _rn intrinsics (nvcc cannot contract them into an FMA or reorder them), on the host
// plain operators compiled with -ffp-contract=off; rintf rounds half to even as nearbyintf.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "qlcuda.h"

#ifdef __CUDACC__
#define QLC_HD __host__ __device__ __forceinline__
#else
#define QLC_HD static inline
#endif

#ifdef __CUDA_ARCH__
#define QLC_DIV(a, b) __fdiv_rn(a, b)
#define QLC_MUL(a, b) __fmul_rn(a, b)
#define QLC_ADD(a, b) __fadd_rn(a, b)
#define QLC_FMA(a, b, c) __fmaf_rn(a, b, c)
#else
#define QLC_DIV(a, b) ((a) / (b))
#define QLC_MUL(a, b) ((a) * (b))
#define QLC_ADD(a, b) ((a) + (b))
#define QLC_FMA(a, b, c) fmaf(a, b, c)
#endif

QLC_HD float qlc_bits_to_float(int32_t bits) {
#ifdef __CUDA_ARCH__
    return __int_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// ql_code: clamp(round_half_to_even(x / s), -lim, lim)
QLC_HD int8_t qlc_code(float x, float s, float lim) {
    float q = rintf(QLC_DIV(x, s));
    return (int8_t)(q > lim ? lim : (q < -lim ? -lim : q));
}

// internal.h's ql_exp_nonpos (t <= 0) and sigmoidf_stable, operation for operation.
QLC_HD float qlc_exp_nonpos(float t) {
    t = t > -87.0f ? t : -87.0f; // NaN -> -87, as the CPU
    float n = rintf(QLC_MUL(t, 1.44269504088896341f));
    float r = QLC_FMA(n, -0.693359375f, t);
    r = QLC_FMA(n, 2.12194440e-4f, r);
    float p = QLC_FMA(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = QLC_FMA(p, r, 8.3334519073e-3f);
    p = QLC_FMA(p, r, 4.1665795894e-2f);
    p = QLC_FMA(p, r, 1.6666665459e-1f);
    p = QLC_FMA(p, r, 5.0000001201e-1f);
    float z = QLC_MUL(r, r);
    p = QLC_FMA(p, z, r);
    p = QLC_ADD(p, 1.0f);
    return QLC_MUL(p, qlc_bits_to_float(((int32_t)n + 127) << 23));
}

QLC_HD float qlc_sigmoid_stable(float x) {
    float e = qlc_exp_nonpos(-fabsf(x)), d = QLC_ADD(1.0f, e);
    float s = x >= 0.0f ? QLC_DIV(1.0f, d) : QLC_DIV(e, d);
    return x != x ? x : s;
}

// The requantization epilogue's value before rounding: acc + offset, times scale, plus bias,
// then the activation (0 none, 1 ReLU, 2 SiLU), as igemm.c's epilogue_value.
QLC_HD float qlc_epilogue_value(int32_t acc, int32_t off, float scale, float bias, int act) {
    float v = QLC_FMA((float)(acc + off), scale, bias);
    if (act == 2) return QLC_MUL(v, qlc_sigmoid_stable(v));
    return act && v < 0.0f ? 0.0f : v;
}

// Element t of NHWC codes from NCHW floats [N, C, HW]: out[n][p][c] = code(x[n][c][p]).
QLC_HD int8_t qlc_quantize_element(int64_t t, const float *x, int C, int64_t HW, float s, float lim) {
    int c = (int)(t % C);
    int64_t p = t / C % HW, n = t / C / HW;
    return qlc_code(x[((int64_t)n * C + c) * HW + p], s, lim);
}

// The simulator's value of a code at scale_in, quantized again at s.
QLC_HD int8_t qlc_requantize_element(int8_t in, float scale_in, float s, float lim) {
    return qlc_code(QLC_MUL((float)in, scale_in), s, lim);
}

// Element t of NCHW floats from NHWC codes: out[n][c][p] = q[n][p][c] * scale.
QLC_HD float qlc_dequantize_element(int64_t t, const int8_t *q, int C, int64_t HW, float scale) {
    int64_t p = t % HW, c = t / HW % C, n = t / HW / C;
    return QLC_MUL((float)q[(n * HW + p) * C + c], scale);
}

// The output size of an int8 conv's geometry (one group); 0 when it is not one.
QLC_HD int qlc_conv_out(const qlc_conv_geom *g, int *OH, int *OW) {
    if (!g || g->groups != 1 || g->N < 0 || g->C <= 0 || g->H <= 0 || g->W <= 0 || g->KH <= 0 || g->KW <= 0 || g->SH <= 0 ||
        g->SW <= 0 || g->PH < 0 || g->PW < 0 || g->DH <= 0 || g->DW <= 0)
        return 0;
    *OH = (g->H + 2 * g->PH - g->DH * (g->KH - 1) - 1) / g->SH + 1;
    *OW = (g->W + 2 * g->PW - g->DW * (g->KW - 1) - 1) / g->SW + 1;
    return *OH > 0 && *OW > 0;
}

// The output size of max pooling (padding at most half the window); 0 when it is not one.
QLC_HD int qlc_pool_out(int N, int H, int W, int C, int k, int stride, int pad, int *OH, int *OW) {
    if (k < 1 || stride < 1 || pad < 0 || pad > k / 2 || N < 0 || C <= 0) return 0;
    *OH = (H + 2 * pad - k) / stride + 1;
    *OW = (W + 2 * pad - k) / stride + 1;
    return *OH >= 1 && *OW >= 1;
}

// Byte t of the NHWC im2col: row = output pixel (n, oh, ow), along it (kh, kw, c); the code
// plus offset, padding the code 0.
QLC_HD uint8_t qlc_im2col_element(int64_t t, const int8_t *x, const qlc_conv_geom &g, int OH, int OW, int offset) {
    const int C = g.C;
    int c = (int)(t % C);
    int64_t rest = t / C;
    int kw = (int)(rest % g.KW), kh = (int)(rest / g.KW % g.KH);
    int64_t r = rest / ((int64_t)g.KW * g.KH);
    int ow = (int)(r % OW), oh = (int)(r / OW % OH), n = (int)(r / ((int64_t)OW * OH));
    int ih = oh * g.SH - g.PH + kh * g.DH, iw = ow * g.SW - g.PW + kw * g.DW;
    int v = (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) ? 0 : x[(((int64_t)n * g.H + ih) * g.W + iw) * C + c];
    return (uint8_t)(v + offset);
}

// Element t of NHWC max pooling (padding never wins: as -inf).
QLC_HD int8_t qlc_maxpool_element(int64_t t, const int8_t *x, int H, int W, int C, int k, int stride, int pad, int OH, int OW) {
    int c = (int)(t % C), ow = (int)(t / C % OW), oh = (int)(t / C / OW % OH), n = (int)(t / C / OW / OH);
    int m = -128;
    for (int i = 0; i < k; i++) {
        int ih = oh * stride - pad + i;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < k; j++) {
            int iw = ow * stride - pad + j;
            if (iw < 0 || iw >= W) continue;
            int v = x[(((int64_t)n * H + ih) * W + iw) * C + c];
            m = v > m ? v : m;
        }
    }
    return (int8_t)m;
}

// For element t of a transposed conv's NHWC output [N, H*KH, W*KW, K]: its index in the
// GEMM's rows [pixel (n, h, w)][(i, j, k)].
QLC_HD int64_t qlc_scatter_source(int64_t t, int H, int W, int KH, int KW, int K) {
    int k = (int)(t % K);
    int64_t rest = t / K;
    int ox = (int)(rest % ((int64_t)W * KW)), oy = (int)(rest / ((int64_t)W * KW) % ((int64_t)H * KH));
    int64_t n = rest / ((int64_t)W * KW * H * KH);
    int y = oy / KH, i = oy % KH, x = ox / KW, j = ox % KW;
    return ((n * H + y) * W + x) * ((int64_t)KH * KW * K) + (int64_t)(i * KW + j) * K + k;
}

// For element t of a dense tensor of `shape`: its index in a tensor read with `strides`.
QLC_HD int64_t qlc_strided_source(int64_t t, const int64_t *strides, const int64_t *shape, int ndim) {
    int64_t at = 0;
    for (int d = ndim - 1; d >= 0; d--) {
        at += t % shape[d] * strides[d];
        t /= shape[d];
    }
    return at;
}

// For element t of NCHW [N, C, HW]: its index in NHWC [N, HW, C].
QLC_HD int64_t qlc_nhwc_source(int64_t t, int64_t HW, int C) {
    int64_t p = t % HW, c = t / HW % C, n = t / HW / C;
    return (n * HW + p) * C + c;
}
