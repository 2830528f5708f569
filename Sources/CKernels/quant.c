/* Fake quantization and calibration reductions (contracts in ckernels.h). */
#include <math.h>
#include <string.h>
#include "internal.h"

static inline float fq(float x, float s, float lim) { return ql_code(x, s, lim) * s; }

void ql_fake_quant_f32(float *restrict y, const float *restrict x, int64_t n, float amax, int qmax) {
    if (!(amax > 0.0f)) {
        memset(y, 0, sizeof(float) * (size_t)n);
        return;
    }
    float s = amax / (float)qmax, lim = (float)qmax;
    for (int64_t i = 0; i < n; i++) y[i] = fq(x[i], s, lim);
}

void ql_fake_quant_per_channel_f32(float *restrict y, const float *restrict x, int64_t outer,
                                   int channels, int64_t inner, const float *amax, int qmax) {
    for (int64_t o = 0; o < outer; o++)
        for (int c = 0; c < channels; c++) {
            int64_t off = (o * channels + c) * inner;
            ql_fake_quant_f32(y + off, x + off, inner, amax[c], qmax);
        }
}

void ql_fake_quant_bwd_f32(float *restrict dx, const float *restrict dy, const float *restrict x,
                           int64_t n, float amax) {
    for (int64_t i = 0; i < n; i++) dx[i] += fabsf(x[i]) <= amax ? dy[i] : 0.0f;
}

void ql_fake_quant_per_channel_bwd_f32(float *restrict dx, const float *restrict dy,
                                       const float *restrict x, int64_t outer, int channels,
                                       int64_t inner, const float *amax) {
    for (int64_t o = 0; o < outer; o++)
        for (int c = 0; c < channels; c++) {
            int64_t off = (o * channels + c) * inner;
            ql_fake_quant_bwd_f32(dx + off, dy + off, x + off, inner, amax[c]);
        }
}

void ql_channel_absmax_f32(float *restrict amax, const float *restrict x, int64_t outer,
                           int channels, int64_t inner) {
    for (int c = 0; c < channels; c++) amax[c] = 0.0f;
    for (int64_t o = 0; o < outer; o++)
        for (int c = 0; c < channels; c++) {
            float m = ql_absmax(x + (o * channels + c) * inner, inner);
            if (m > amax[c]) amax[c] = m;
        }
}

void ql_histogram_abs_f32(int64_t *restrict counts, int bins, const float *restrict x, int64_t n,
                          float range) {
    if (bins <= 0 || !(range > 0.0f)) return;
    float scale = (float)bins / range;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        int b = a >= range ? bins - 1 : (int)(a * scale);
        if (b >= bins) b = bins - 1; /* rounding at the top edge */
        if (b < 0) b = 0;            /* NaN: counted in bin 0 rather than dropped */
        counts[b]++;
    }
}

void ql_fake_quant_affine_f32(float *restrict y, const float *restrict x, int64_t n, float scale, int zero_point,
                              int qmin, int qmax) {
    if (!(scale > 0.0f)) {
        memset(y, 0, sizeof(float) * (size_t)n);
        return;
    }
    float zp = (float)zero_point, lo = (float)qmin, hi = (float)qmax;
    for (int64_t i = 0; i < n; i++) {
        float q = nearbyintf(x[i] / scale) + zp;
        q = q > hi ? hi : (q < lo ? lo : q);
        y[i] = (q - zp) * scale;
    }
}

void ql_fake_quant_affine_bwd_f32(float *restrict dx, const float *restrict dy, const float *restrict x, int64_t n,
                                  float scale, int zero_point, int qmin, int qmax) {
    float lo = ((float)qmin - (float)zero_point) * scale, hi = ((float)qmax - (float)zero_point) * scale;
    for (int64_t i = 0; i < n; i++) dx[i] += (x[i] >= lo && x[i] <= hi) ? dy[i] : 0.0f;
}
