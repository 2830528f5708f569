/* Image preprocessing kernels (contracts in ckernels.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
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

/* Shared by both letterbox outputs: resamples output row y of the resized image into row[new_w * 3]
 * (bytes), from the column tables x0/x1 (element offsets) and wx. h0/h1 are scratch rows. */
static void letterbox_row(uint8_t *restrict row, int y, const uint8_t *restrict in, int in_h, int in_w, int new_h,
                          int new_w, const int *restrict x0, const int *restrict x1, const float *restrict wx,
                          float *restrict h0, float *restrict h1) {
    int y0, y1;
    float wy;
    source_coord(y, (float)in_h / (float)new_h, in_h, &y0, &y1, &wy);
    const uint8_t *r0 = in + (size_t)y0 * in_w * 3, *r1 = in + (size_t)y1 * in_w * 3;
    int n = new_w * 3;
    if (in_w == new_w && in_h == new_h) { /* no resize (the DCT-scaled decode hit the size): the weights are 0 */
        memcpy(row, r0, (size_t)n);
        return;
    }
    for (int i = 0; i < n; i++) {
        float a = r0[x0[i]], b = r0[x1[i]];
        h0[i] = a + wx[i] * (b - a);
    }
    for (int i = 0; i < n; i++) {
        float a = r1[x0[i]], b = r1[x1[i]];
        h1[i] = a + wx[i] * (b - a);
    }
    for (int i = 0; i < n; i++) row[i] = clamp_u8(h0[i] + wy * (h1[i] - h0[i]));
}

/* Column tables (per output element: both source offsets and the weight), a byte row and two
 * float rows, in one allocation. NULL on a bad geometry or out of memory. */
static void *letterbox_setup(int out_h, int out_w, int in_h, int in_w, int new_h, int new_w, int off_y, int off_x,
                             int **x0, int **x1, float **wx, uint8_t **row, float **h0, float **h1) {
    if (out_h <= 0 || out_w <= 0 || in_h <= 0 || in_w <= 0 || new_h <= 0 || new_w <= 0 || off_y < 0 || off_x < 0 ||
        off_y + new_h > out_h || off_x + new_w > out_w)
        return NULL;
    size_t n = (size_t)new_w * 3;
    char *mem = malloc(n * (2 * sizeof(int) + 3 * sizeof(float)) + n);
    if (!mem) return NULL;
    *x0 = (int *)mem;
    *x1 = *x0 + n;
    *wx = (float *)(*x1 + n);
    *h0 = *wx + n;
    *h1 = *h0 + n;
    *row = (uint8_t *)(*h1 + n);
    float sx = (float)in_w / (float)new_w;
    for (int x = 0; x < new_w; x++) {
        int a, b;
        float w;
        source_coord(x, sx, in_w, &a, &b, &w);
        for (int c = 0; c < 3; c++) {
            (*x0)[x * 3 + c] = a * 3 + c;
            (*x1)[x * 3 + c] = b * 3 + c;
            (*wx)[x * 3 + c] = w;
        }
    }
    return mem;
}

int ql_letterbox_f32chw(float *restrict out, int out_h, int out_w, const uint8_t *restrict in, int in_h, int in_w,
                        int new_h, int new_w, int off_y, int off_x, uint8_t pad, const float *restrict lut) {
    int *x0, *x1;
    float *wx, *h0, *h1;
    uint8_t *row;
    void *mem = letterbox_setup(out_h, out_w, in_h, in_w, new_h, new_w, off_y, off_x, &x0, &x1, &wx, &row, &h0, &h1);
    if (!mem) return -1;
    size_t plane = (size_t)out_h * out_w;
    for (int c = 0; c < 3; c++) {
        float v = lut[c * 256 + pad], *o = out + c * plane;
        for (int y = 0; y < out_h; y++) {
            if (y < off_y || y >= off_y + new_h) {
                for (int x = 0; x < out_w; x++) o[(size_t)y * out_w + x] = v;
            } else {
                for (int x = 0; x < off_x; x++) o[(size_t)y * out_w + x] = v;
                for (int x = off_x + new_w; x < out_w; x++) o[(size_t)y * out_w + x] = v;
            }
        }
    }
    for (int y = 0; y < new_h; y++) {
        letterbox_row(row, y, in, in_h, in_w, new_h, new_w, x0, x1, wx, h0, h1);
        size_t base = (size_t)(off_y + y) * out_w + off_x;
        float *o0 = out + base, *o1 = out + plane + base, *o2 = out + 2 * plane + base;
        const float *l0 = lut, *l1 = lut + 256, *l2 = lut + 512;
        for (int x = 0; x < new_w; x++) {
            o0[x] = l0[row[3 * x]];
            o1[x] = l1[row[3 * x + 1]];
            o2[x] = l2[row[3 * x + 2]];
        }
    }
    free(mem);
    return 0;
}

int ql_letterbox_s8nhwc(int8_t *restrict out, int out_h, int out_w, const uint8_t *restrict in, int in_h, int in_w,
                        int new_h, int new_w, int off_y, int off_x, uint8_t pad, const int8_t *restrict lut) {
    int *x0, *x1;
    float *wx, *h0, *h1;
    uint8_t *row;
    void *mem = letterbox_setup(out_h, out_w, in_h, in_w, new_h, new_w, off_y, off_x, &x0, &x1, &wx, &row, &h0, &h1);
    if (!mem) return -1;
    int8_t p0 = lut[pad], p1 = lut[256 + pad], p2 = lut[512 + pad];
    for (size_t i = 0; i < (size_t)out_h * out_w; i++) {
        out[3 * i] = p0;
        out[3 * i + 1] = p1;
        out[3 * i + 2] = p2;
    }
    for (int y = 0; y < new_h; y++) {
        letterbox_row(row, y, in, in_h, in_w, new_h, new_w, x0, x1, wx, h0, h1);
        int8_t *o = out + ((size_t)(off_y + y) * out_w + off_x) * 3;
        for (int x = 0; x < new_w; x++) {
            o[3 * x] = lut[row[3 * x]];
            o[3 * x + 1] = lut[256 + row[3 * x + 1]];
            o[3 * x + 2] = lut[512 + row[3 * x + 2]];
        }
    }
    free(mem);
    return 0;
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
