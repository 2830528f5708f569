/* JPEG through libjpeg(-turbo) with setjmp-based error recovery (see cimageio.h). */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include "cimageio.h"

#define MAX_PIXELS (1u << 28)

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *e = (error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->message);
    longjmp(e->jump, 1);
}

/* Warnings (e.g. "premature end of data") would otherwise print to stderr and yield a
 * silently grey-filled image: treat corrupt-data warnings as errors. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo);
}

static void set_err(char *err, size_t errlen, const char *msg) {
    if (err && errlen) {
        strncpy(err, msg, errlen - 1);
        err[errlen - 1] = '\0';
    }
}

static int read_header(struct jpeg_decompress_struct *cinfo, error_mgr *jerr, const uint8_t *data,
                       size_t size) {
    cinfo->err = jpeg_std_error(&jerr->base);
    jerr->base.error_exit = on_error;
    jerr->base.emit_message = on_message;
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_read_header(cinfo, TRUE);
    return 0;
}

int qlio_jpeg_size(const uint8_t *data, size_t size, int *width, int *height, char *err, size_t errlen) {
    struct jpeg_decompress_struct cinfo;
    error_mgr jerr;
    if (!data || size < 4) {
        set_err(err, errlen, "not a JPEG: fewer than 4 bytes");
        return -1;
    }
    if (setjmp(jerr.jump)) {
        set_err(err, errlen, jerr.message);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    read_header(&cinfo, &jerr, data, size);
    *width = (int)cinfo.image_width;
    *height = (int)cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

int qlio_jpeg_decode(const uint8_t *data, size_t size, int fancy_upsampling, uint8_t **rgb, int *width, int *height,
                     char *err, size_t errlen) {
    return qlio_jpeg_decode_scaled(data, size, fancy_upsampling, 1, rgb, width, height, err, errlen);
}

int qlio_jpeg_decode_scaled(const uint8_t *data, size_t size, int fancy_upsampling, int scale_denom, uint8_t **rgb,
                            int *width, int *height, char *err, size_t errlen) {
    struct jpeg_decompress_struct cinfo;
    error_mgr jerr;
    uint8_t *volatile pixels = NULL; /* volatile: survives the longjmp */
    *rgb = NULL;
    if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8) {
        set_err(err, errlen, "scale_denom must be 1, 2, 4 or 8");
        return -1;
    }
    if (!data || size < 4) {
        set_err(err, errlen, "not a JPEG: fewer than 4 bytes");
        return -1;
    }
    if (setjmp(jerr.jump)) {
        set_err(err, errlen, jerr.message);
        free(pixels);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    read_header(&cinfo, &jerr, data, size);
    if ((uint64_t)cinfo.image_width * cinfo.image_height > MAX_PIXELS || cinfo.image_width == 0 ||
        cinfo.image_height == 0) {
        set_err(err, errlen, "image size out of range");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.do_fancy_upsampling = fancy_upsampling ? TRUE : FALSE;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);
    size_t stride = (size_t)cinfo.output_width * 3;
    pixels = (uint8_t *)malloc(stride * cinfo.output_height);
    if (!pixels) {
        set_err(err, errlen, "out of memory");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = pixels + stride * cinfo.output_scanline;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    *width = (int)cinfo.output_width;
    *height = (int)cinfo.output_height;
    jpeg_destroy_decompress(&cinfo);
    *rgb = pixels;
    return 0;
}

int qlio_jpeg_encode(const uint8_t *rgb, int width, int height, int quality, int subsample_chroma, uint8_t **out,
                     size_t *outsize, char *err, size_t errlen) {
    struct jpeg_compress_struct cinfo;
    error_mgr jerr;
    unsigned char *volatile buffer = NULL;
    unsigned long size = 0;
    *out = NULL;
    *outsize = 0;
    if (!rgb || width <= 0 || height <= 0 || (uint64_t)width * height > MAX_PIXELS || quality < 1 || quality > 100) {
        set_err(err, errlen, "invalid image size or quality");
        return -1;
    }
    cinfo.err = jpeg_std_error(&jerr.base);
    jerr.base.error_exit = on_error;
    if (setjmp(jerr.jump)) {
        set_err(err, errlen, jerr.message);
        jpeg_destroy_compress(&cinfo);
        free(buffer);
        return -1;
    }
    jpeg_create_compress(&cinfo);
    jpeg_mem_dest(&cinfo, (unsigned char **)&buffer, &size);
    cinfo.image_width = (JDIMENSION)width;
    cinfo.image_height = (JDIMENSION)height;
    cinfo.input_components = 3;
    cinfo.in_color_space = JCS_RGB;
    jpeg_set_defaults(&cinfo);
    jpeg_set_quality(&cinfo, quality, TRUE);
    if (!subsample_chroma) /* the defaults sample luma 2x2 against chroma: make all 1x1 */
        for (int c = 0; c < cinfo.num_components; c++) cinfo.comp_info[c].h_samp_factor = cinfo.comp_info[c].v_samp_factor = 1;
    jpeg_start_compress(&cinfo, TRUE);
    size_t stride = (size_t)width * 3;
    while (cinfo.next_scanline < cinfo.image_height) {
        JSAMPROW row = (JSAMPROW)(rgb + stride * cinfo.next_scanline);
        jpeg_write_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_compress(&cinfo);
    jpeg_destroy_compress(&cinfo);
    *out = buffer;
    *outsize = size;
    return 0;
}

void qlio_free(void *p) { free(p); }
