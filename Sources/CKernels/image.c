/* Image preprocessing kernels (contracts in ckernels.h). */
#include <math.h>
#include "internal.h"

static inline uint8_t clamp_u8(float v) { return v <= 0.0f ? 0 : (v >= 255.0f ? 255 : (uint8_t)(v + 0.5f)); }

/* Source coordinate of output index d (half-pixel centres, clamped): the two neighbours
 * i0, i1 and the weight w of i1. */
static inline void source_coord(int d, float scale, int n, int *i0, int *i1, float *w) {
    float f = ((float)d + 0.5f) * scale - 0.5f;
    if (f < 0) f = 0;
    int a = (int)f;
    if (a > n - 1) a = n - 1;
    *i0 = a;
    *i1 = a + 1 < n ? a + 1 : n - 1;
    *w = f - (float)a;
    if (*w > 1) *w = 1;
}

void ql_resize_bilinear_u8(uint8_t *restrict out, int out_h, int out_w, const uint8_t *restrict in,
                           int in_h, int in_w, int channels) {
    float sy = (float)in_h / (float)out_h, sx = (float)in_w / (float)out_w;
    for (int y = 0; y < out_h; y++) {
        int y0, y1, x0, x1;
        float wy, wx;
        source_coord(y, sy, in_h, &y0, &y1, &wy);
        for (int x = 0; x < out_w; x++) {
            source_coord(x, sx, in_w, &x0, &x1, &wx);
            const uint8_t *p00 = in + ((size_t)y0 * in_w + x0) * channels, *p01 = in + ((size_t)y0 * in_w + x1) * channels;
            const uint8_t *p10 = in + ((size_t)y1 * in_w + x0) * channels, *p11 = in + ((size_t)y1 * in_w + x1) * channels;
            uint8_t *o = out + ((size_t)y * out_w + x) * channels;
            for (int c = 0; c < channels; c++) {
                float top = p00[c] + wx * (p01[c] - p00[c]), bottom = p10[c] + wx * (p11[c] - p10[c]);
                o[c] = clamp_u8(top + wy * (bottom - top));
            }
        }
    }
}

void ql_u8hwc_to_f32chw(float *restrict out, const uint8_t *restrict in, int h, int w,
                        const float *scale, const float *shift, int flip) {
    size_t plane = (size_t)h * w;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            const uint8_t *p = in + ((size_t)y * w + (flip ? w - 1 - x : x)) * 3;
            size_t o = (size_t)y * w + x;
            out[o] = p[0] * scale[0] + shift[0];
            out[plane + o] = p[1] * scale[1] + shift[1];
            out[2 * plane + o] = p[2] * scale[2] + shift[2];
        }
}

void ql_hsv_jitter_u8(uint8_t *rgb, int64_t pixels, float gain_h, float gain_s, float gain_v) {
    for (int64_t i = 0; i < pixels; i++) {
        uint8_t *p = rgb + i * 3;
        float r = p[0] / 255.0f, g = p[1] / 255.0f, b = p[2] / 255.0f;
        float mx = fmaxf(r, fmaxf(g, b)), mn = fminf(r, fminf(g, b)), d = mx - mn;
        float h = 0.0f, s = mx > 0 ? d / mx : 0.0f, v = mx;
        if (d > 0) {
            if (mx == r) h = 60.0f * fmodf((g - b) / d, 6.0f);
            else if (mx == g) h = 60.0f * ((b - r) / d + 2.0f);
            else h = 60.0f * ((r - g) / d + 4.0f);
            if (h < 0) h += 360.0f;
        }
        h = fmodf(h * gain_h, 360.0f);
        s = fminf(fmaxf(s * gain_s, 0.0f), 1.0f);
        v = fminf(fmaxf(v * gain_v, 0.0f), 1.0f);
        float c = v * s, hp = h / 60.0f, xx = c * (1.0f - fabsf(fmodf(hp, 2.0f) - 1.0f)), m = v - c;
        float r1 = 0, g1 = 0, b1 = 0;
        switch ((int)hp % 6) {
        case 0: r1 = c; g1 = xx; break;
        case 1: r1 = xx; g1 = c; break;
        case 2: g1 = c; b1 = xx; break;
        case 3: g1 = xx; b1 = c; break;
        case 4: r1 = xx; b1 = c; break;
        default: r1 = c; b1 = xx; break;
        }
        p[0] = clamp_u8((r1 + m) * 255.0f);
        p[1] = clamp_u8((g1 + m) * 255.0f);
        p[2] = clamp_u8((b1 + m) * 255.0f);
    }
}
