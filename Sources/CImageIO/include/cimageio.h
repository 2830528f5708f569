/*
 * cimageio.h — JPEG decode/encode through libjpeg(-turbo), made safe for Swift.
 *
 * libjpeg reports errors by calling error_exit, whose default ends the process; the usual
 * fix is a longjmp back to the caller, which Swift frames cannot survive. These wrappers do
 * the setjmp/longjmp entirely in C and return a status plus a message instead.
 *
 * Images are 8-bit RGB, HWC, rows packed (stride = 3 * width).
 */
#ifndef QUANTLAB_CIMAGEIO_H
#define QUANTLAB_CIMAGEIO_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Decodes a JPEG held in memory. On success returns 0 and sets *rgb (malloc'ed, free with
 * qlio_free), *width, *height. On failure returns -1, leaves *rgb NULL and writes a
 * NUL-terminated reason into err (errlen bytes). Grayscale and CMYK inputs are converted
 * to RGB by libjpeg. Images larger than 2^28 pixels are refused. fancy_upsampling nonzero:
 * libjpeg's default triangle filter for subsampled chroma; zero: each chroma sample
 * replicated over the pixels it covers. */
int qlio_jpeg_decode(const uint8_t *data, size_t size, int fancy_upsampling, uint8_t **rgb, int *width, int *height,
                     char *err, size_t errlen);

/* The same, decoded at 1/scale_denom of the size (1, 2, 4 or 8) in the DCT domain: libjpeg
 * computes each 8x8 block's reduced inverse DCT (a 4x4, 2x2 or 1x1 output), so the image is
 * never built at full size. Output size ceil(width / scale_denom) x ceil(height / scale_denom).
 * Much cheaper than a full decode and a resize when the target is small (DALI's and
 * PIL's draft mode's trick); the result is a box-like low-pass of the image, not bilinear
 * samples of it. */
int qlio_jpeg_decode_scaled(const uint8_t *data, size_t size, int fancy_upsampling, int scale_denom, uint8_t **rgb,
                            int *width, int *height, char *err, size_t errlen);

/* Reads only the header: image size without decoding. Same error convention. */
int qlio_jpeg_size(const uint8_t *data, size_t size, int *width, int *height, char *err, size_t errlen);

/* Encodes RGB to JPEG at quality 1..100, chroma subsampled 4:2:0 (as most cameras and COCO)
 * when subsample_chroma is nonzero, else 4:4:4. On success returns 0 and sets *out
 * (malloc'ed, free with qlio_free) and *outsize. */
int qlio_jpeg_encode(const uint8_t *rgb, int width, int height, int quality, int subsample_chroma, uint8_t **out,
                     size_t *outsize, char *err, size_t errlen);

void qlio_free(void *p);

#ifdef __cplusplus
}
#endif
#endif
