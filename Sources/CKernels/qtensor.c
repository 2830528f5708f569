/* INT8 activation tensors of the engine (contracts in ckernels.h).
 *
 * The engine keeps quantized activations as signed int8 codes in NHWC order: a conv computed
 * as a GEMM with one row per output pixel and one column per output channel writes exactly
 * that layout, and the next conv's im2col reads each tap's channels as one contiguous run.
 * Codes follow TensorRT's symmetric convention, the fake quantizer's exactly:
 *   s = amax / qmax,  code = clamp(round_half_to_even(x / s), -qmax, qmax),  x' = code * s. */
#include <math.h>
#include <string.h>
#include "internal.h"

void ql_quantize_nchw_to_nhwc_s8(int8_t *restrict out, const float *restrict x, int N, int C, int HW,
                                 float amax, int qmax) {
    if (!(amax > 0.0f)) {
        memset(out, 0, (size_t)N * C * HW);
        return;
    }
    float s = amax / (float)qmax, lim = (float)qmax;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            const float *xc = x + ((size_t)n * C + c) * HW;
            int8_t *o = out + (size_t)n * HW * C + c;
            for (int p = 0; p < HW; p++) {
                float q = nearbyintf(xc[p] / s); /* the fake quantizer's expression, bit for bit */
                q = q > lim ? lim : (q < -lim ? -lim : q);
                o[(size_t)p * C] = (int8_t)q;
            }
        }
}

void ql_dequantize_nhwc_to_nchw_f32(float *restrict out, const int8_t *restrict q, int N, int C, int HW,
                                   float scale) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            float *oc = out + ((size_t)n * C + c) * HW;
            const int8_t *qc = q + (size_t)n * HW * C + c;
            for (int p = 0; p < HW; p++) oc[p] = (float)qc[(size_t)p * C] * scale;
        }
}

int ql_s8_min(const int8_t *x, int64_t n) {
    int m = 127;
    for (int64_t i = 0; i < n; i++) m = x[i] < m ? x[i] : m;
    return m;
}

int ql_im2col_nhwc_s8u8(uint8_t *restrict col, const int8_t *restrict x, const ql_conv_geom *g, int offset) {
    int OH, OW;
    if (!g || g->groups != 1 || ql_conv_out_size(g, &OH, &OW) != QL_OK || (offset != 0 && offset != 128)) return QL_EINVAL;
    const int C = g->C, H = g->H, W = g->W;
    const size_t row = (size_t)g->KH * g->KW * C;
    const uint8_t pad = (uint8_t)offset; /* the code 0, shifted */
    for (int n = 0; n < g->N; n++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                uint8_t *dst = col + (((size_t)n * OH + oh) * OW + ow) * row;
                for (int kh = 0; kh < g->KH; kh++) {
                    int ih = oh * g->SH - g->PH + kh * g->DH;
                    for (int kw = 0; kw < g->KW; kw++, dst += C) {
                        int iw = ow * g->SW - g->PW + kw * g->DW;
                        if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                            memset(dst, pad, (size_t)C);
                            continue;
                        }
                        const int8_t *src = x + (((size_t)n * H + ih) * W + iw) * C;
                        if (offset == 0)
                            memcpy(dst, src, (size_t)C); /* non-negative codes: the same bytes */
                        else
                            for (int c = 0; c < C; c++) dst[c] = (uint8_t)(src[c] + 128);
                    }
                }
            }
    return QL_OK;
}
