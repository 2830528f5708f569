// engine_ops_host.cpp — the element functions of the GPU's INT8 engine kernels and INT8
// epilogue (cuda/engine_ops.cuh), compiled for the host and compared element by element with
// the CPU kernels they must equal bit for bit (qtensor.c, ql_requantize_s8_ref,
// ql_dequantize_f32_ref). The GPU conformance suite checks the kernels themselves on a device;
// this catches an index or arithmetic mistake on any machine, GPU or not. Built and run by
// scripts/build_cuda.sh (`make cuda`); exits 1 on the first kind of mismatch, naming it.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include "engine_ops.cuh"
extern "C" {
#include "ckernels.h"
}

static int failures = 0;
static void check(bool ok, const char *what) {
    if (!ok) { fprintf(stderr, "✗ engine_ops on the host: %s differs from the CPU kernel\n", what); failures++; }
}

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint64_t next() { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next() >> 40) / (float)(1 << 24); }

static bool same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

int main() {
    // quantize: values on and next to the half-way points of the grid, and beyond amax
    for (int shape = 0; shape < 3; shape++) {
        int N = shape == 0 ? 2 : 1, C = shape == 0 ? 5 : shape == 1 ? 3 : 1, HW = shape == 0 ? 63 : shape == 1 ? 160 * 160 : 1000;
        float amax = shape == 2 ? 0.37f : 1.5f, s = amax / 127.0f;
        size_t total = (size_t)N * C * HW;
        std::vector<float> x(total);
        for (size_t i = 0; i < total; i++) {
            float half = ((float)((int)(next() % 301) - 150) + 0.5f) * s;
            x[i] = i % 3 == 0 ? half : i % 3 == 1 ? nextafterf(half, 1e9f) : uniform(-2 * amax, 2 * amax);
        }
        std::vector<int8_t> want(total), got(total);
        ql_quantize_nchw_to_nhwc_s8(want.data(), x.data(), N, C, HW, amax, 127);
        for (size_t t = 0; t < total; t++) got[t] = qlc_quantize_element((int64_t)t, x.data(), C, HW, s, 127.0f);
        check(want == got, "quantize NCHW -> NHWC");
    }
    // requantize: every code at several scales
    {
        std::vector<int8_t> in(255), want(255), got(255);
        for (int i = 0; i < 255; i++) in[i] = (int8_t)(i - 127);
        for (float scale_in : {0.01f, 1.0f / 127.0f, 0.0123f}) {
            for (float amax_out : {0.5f, 1.0f, 3.3f}) {
                ql_requantize_codes_s8(want.data(), in.data(), 255, scale_in, amax_out, 127);
                for (int i = 0; i < 255; i++) got[i] = qlc_requantize_element(in[i], scale_in, amax_out / 127.0f, 127.0f);
                check(want == got, "requantize");
            }
        }
    }
    // dequantize NHWC -> NCHW
    {
        int N = 2, C = 7, HW = 45;
        std::vector<int8_t> q(N * C * HW);
        for (auto &v : q) v = (int8_t)(next() % 255 - 127);
        std::vector<float> want(q.size()), got(q.size());
        ql_dequantize_nhwc_to_nchw_f32(want.data(), q.data(), N, C, HW, 0.0123f);
        for (size_t t = 0; t < q.size(); t++) got[t] = qlc_dequantize_element((int64_t)t, q.data(), C, HW, 0.0123f);
        check(same_bits(want.data(), got.data(), q.size()), "dequantize NHWC -> NCHW");
    }
    // im2col: strides, padding, dilation, a 1 x 1 kernel, both offsets
    {
        int N = 2, C = 6, H = 9, W = 11;
        std::vector<int8_t> x(N * H * W * C), nonneg(x.size());
        for (size_t i = 0; i < x.size(); i++) { x[i] = (int8_t)(next() % 255 - 127); nonneg[i] = x[i] < 0 ? 0 : x[i]; }
        // KH, KW, SH, SW, PH, PW, DH, DW: each pair also unequal, so that a height/width mix-up shows
        int geoms[][8] = {{3, 3, 1, 1, 1, 1, 1, 1}, {3, 3, 2, 2, 1, 1, 1, 1}, {3, 3, 1, 1, 2, 2, 2, 2}, {1, 1, 1, 1, 0, 0, 1, 1},
                          {5, 5, 2, 2, 2, 2, 1, 1}, {3, 1, 2, 1, 1, 0, 2, 1}, {1, 3, 1, 2, 0, 2, 1, 2}};
        for (auto &k : geoms) {
            for (int offset : {0, 128}) {
                ql_conv_geom g = {N, C, H, W, 4, k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], 1};
                qlc_conv_geom gg = {N, C, H, W, 4, k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], 1};
                int OH, OW;
                ql_conv_out_size(&g, &OH, &OW);
                size_t total = (size_t)N * OH * OW * k[0] * k[1] * C;
                const int8_t *src = offset == 0 ? nonneg.data() : x.data();
                std::vector<uint8_t> want(total), got(total);
                check(ql_im2col_nhwc_s8u8(want.data(), src, &g, offset) == 0, "im2col status");
                for (size_t t = 0; t < total; t++) got[t] = qlc_im2col_element((int64_t)t, src, gg, OH, OW, offset);
                check(want == got, "int8 im2col");
            }
        }
        // max pooling
        int pools[][3] = {{5, 1, 2}, {3, 2, 1}, {2, 2, 0}, {1, 1, 0}};
        for (auto &p : pools) {
            int OH = (H + 2 * p[2] - p[0]) / p[1] + 1, OW = (W + 2 * p[2] - p[0]) / p[1] + 1;
            size_t total = (size_t)N * OH * OW * C;
            std::vector<int8_t> want(total), got(total);
            check(ql_maxpool_nhwc_s8(want.data(), x.data(), N, H, W, C, p[0], p[1], p[2]) == 0, "max pool status");
            for (size_t t = 0; t < total; t++) got[t] = qlc_maxpool_element((int64_t)t, x.data(), H, W, C, p[0], p[1], p[2], OH, OW);
            check(want == got, "int8 max pooling");
        }
    }
    // scatter of a transposed conv's GEMM rows, and NHWC -> NCHW, against the loops they replace
    // (Int8Conv.runTransposed's scatter; Tensor.permuted([0, 3, 1, 2]))
    {
        int N = 2, H = 3, W = 5, KH = 2, KW = 3, K = 4;
        bool ok = true;
        for (int n = 0; n < N; n++) for (int y = 0; y < H; y++) for (int xx = 0; xx < W; xx++)
            for (int i = 0; i < KH; i++) for (int j = 0; j < KW; j++) for (int k = 0; k < K; k++) {
                int64_t out = (((int64_t)n * H * KH + y * KH + i) * W * KW + xx * KW + j) * K + k;
                int64_t src = (((int64_t)n * H + y) * W + xx) * KH * KW * K + (i * KW + j) * K + k;
                ok = ok && qlc_scatter_source(out, H, W, KH, KW, K) == src;
            }
        check(ok, "transposed conv scatter");
        int C = 5, HW = 7;
        ok = true;
        for (int n = 0; n < N; n++) for (int c = 0; c < C; c++) for (int p = 0; p < HW; p++)
            ok = ok && qlc_nhwc_source(((int64_t)n * C + c) * HW + p, HW, C) == ((int64_t)n * HW + p) * C + c;
        check(ok, "NHWC -> NCHW");
    }
    // the strided copy behind permute and slice, against ql_copy_strided
    {
        std::vector<float> in(2 * 3 * 4 * 5);
        for (auto &v : in) v = uniform(-1, 1);
        int64_t perm_shape[4] = {2, 4, 5, 3}, perm_strides[4] = {60, 5, 1, 20}; // [N, C, H, W] -> [N, H, W, C]
        int64_t slice_shape[4] = {2, 3, 2, 5}, slice_strides[4] = {60, 20, 5, 1}; // H in [1, 3), from in + 5
        for (int which = 0; which < 2; which++) {
            const int64_t *shape = which ? slice_shape : perm_shape, *strides = which ? slice_strides : perm_strides;
            const float *src = in.data() + (which ? 5 : 0);
            size_t total = (size_t)(shape[0] * shape[1] * shape[2] * shape[3]);
            std::vector<float> want(total), got(total);
            ql_copy_strided(want.data(), src, strides, shape, 4);
            for (size_t t = 0; t < total; t++) got[t] = src[qlc_strided_source((int64_t)t, strides, shape, 4)];
            check(same_bits(want.data(), got.data(), total), which ? "strided copy (slice)" : "strided copy (permute)");
        }
    }
    // the epilogue: none, ReLU and SiLU, to int8 (round half to even, clamp) and to float,
    // over accumulators whose values span SiLU's whole range (exp underflow included)
    {
        const int M = 64, Nc = 97;
        std::vector<int32_t> acc(M * Nc), off(Nc);
        std::vector<float> scale(Nc), bias(Nc);
        for (int j = 0; j < Nc; j++) { off[j] = (int32_t)(next() % 2001) - 1000; scale[j] = uniform(1e-4f, 0.05f); bias[j] = uniform(-3, 3); }
        for (auto &a : acc) a = (int32_t)(next() % 400001) - 200000;
        for (int act = 0; act <= 2; act++) {
            std::vector<int8_t> want8(M * Nc), got8(M * Nc);
            std::vector<float> wantf(M * Nc), gotf(M * Nc);
            ql_requantize_s8_ref(M, Nc, want8.data(), Nc, acc.data(), Nc, off.data(), scale.data(), bias.data(), act);
            ql_dequantize_f32_ref(M, Nc, wantf.data(), Nc, acc.data(), Nc, off.data(), scale.data(), bias.data(), act);
            for (int i = 0; i < M; i++) for (int j = 0; j < Nc; j++) {
                float v = qlc_epilogue_value(acc[i * Nc + j], off[j], scale[j], bias[j], act);
                float q = rintf(v); // the device's __float2int_rn, then the clamp
                got8[i * Nc + j] = (int8_t)(q > 127 ? 127 : (q < -127 ? -127 : q));
                gotf[i * Nc + j] = v;
            }
            check(want8 == got8, act == 2 ? "epilogue int8, SiLU" : act == 1 ? "epilogue int8, ReLU" : "epilogue int8");
            check(same_bits(wantf.data(), gotf.data(), wantf.size()), act == 2 ? "epilogue float, SiLU" : act == 1 ? "epilogue float, ReLU" : "epilogue float");
        }
    }
    if (failures) return 1;
    printf("✓ engine_ops on the host: quantize, requantize, dequantize, int8 im2col, max pooling, scatter, NHWC -> NCHW, the strided copy and the epilogue (ReLU, SiLU) equal the CPU kernels bit for bit\n");
    return 0;
}
