// preprocess.cu — the GPU side of the detection input pipeline (the DALI-style experiment):
// bilinear resize (twin of ql_resize_bilinear_u8), normalise + HWC->CHW (+ mirror; twin of
// ql_u8hwc_to_f32chw), and JPEG decode through nvJPEG.
//
// nvJPEG is opened with dlopen on first use rather than linked: the plugin then loads (and
// its other kernels work) on machines without libnvjpeg, where decode reports
// QLC_EUNAVAILABLE. Versions: one each, one thread per output pixel. Results match the CPU
// within 1 grey level for resize (nvcc contracts a*b+c into FMA; the CPU build does not)
// and within float rounding for normalisation.
#include <dlfcn.h>
#include <mutex>
#include <stdlib.h>
#include <string>
#include <nvjpeg.h>
#include "common.cuh"

__global__ void resize_kernel(uint8_t *out, int out_h, int out_w, const uint8_t *in, int in_h, int in_w, int channels) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= out_w || y >= out_h) return;
    float sy = (float)in_h / (float)out_h, sx = (float)in_w / (float)out_w;
    float fy = fmaxf(((float)y + 0.5f) * sy - 0.5f, 0.0f), fx = fmaxf(((float)x + 0.5f) * sx - 0.5f, 0.0f);
    int y0 = min((int)fy, in_h - 1), x0 = min((int)fx, in_w - 1);
    int y1 = min(y0 + 1, in_h - 1), x1 = min(x0 + 1, in_w - 1);
    float wy = fminf(fy - (float)y0, 1.0f), wx = fminf(fx - (float)x0, 1.0f);
    for (int c = 0; c < channels; c++) {
        float p00 = in[((size_t)y0 * in_w + x0) * channels + c], p01 = in[((size_t)y0 * in_w + x1) * channels + c];
        float p10 = in[((size_t)y1 * in_w + x0) * channels + c], p11 = in[((size_t)y1 * in_w + x1) * channels + c];
        float top = p00 + wx * (p01 - p00), bottom = p10 + wx * (p11 - p10), v = top + wy * (bottom - top);
        out[((size_t)y * out_w + x) * channels + c] = v <= 0.0f ? 0 : (v >= 255.0f ? 255 : (uint8_t)(v + 0.5f));
    }
}

static int resize_bilinear(qlc_stream s, uint8_t *out, int out_h, int out_w, const uint8_t *in, int in_h, int in_w, int channels) {
    if (out_h <= 0 || out_w <= 0 || in_h <= 0 || in_w <= 0 || channels <= 0) return qlc_fail(QLC_EINVAL, "resize_bilinear_u8: bad sizes");
    resize_kernel<<<dim3((out_w + 15) / 16, (out_h + 15) / 16), dim3(16, 16), 0, as_stream(s)>>>(out, out_h, out_w, in, in_h, in_w, channels);
    return qlc_check_launch("resize_bilinear_u8");
}

struct Affine3 { float scale[3], shift[3]; };

__global__ void to_chw_kernel(float *out, const uint8_t *in, int h, int w, Affine3 t, int flip) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    const uint8_t *p = in + ((size_t)y * w + (flip ? w - 1 - x : x)) * 3;
    size_t plane = (size_t)h * w, o = (size_t)y * w + x;
    for (int c = 0; c < 3; c++) out[c * plane + o] = (float)p[c] * t.scale[c] + t.shift[c];
}

static int to_chw(qlc_stream s, float *out, const uint8_t *in, int h, int w, const float *scale, const float *shift, int flip) {
    if (h <= 0 || w <= 0 || !scale || !shift) return qlc_fail(QLC_EINVAL, "u8hwc_to_f32chw: bad arguments");
    Affine3 t;
    for (int c = 0; c < 3; c++) { t.scale[c] = scale[c]; t.shift[c] = shift[c]; }
    to_chw_kernel<<<dim3((w + 15) / 16, (h + 15) / 16), dim3(16, 16), 0, as_stream(s)>>>(out, in, h, w, t, flip);
    return qlc_check_launch("u8hwc_to_f32chw");
}

// ---- nvJPEG, resolved at run time -----------------------------------------------------------
static struct {
    std::once_flag once;
    void *lib = nullptr;
    decltype(&nvjpegCreateSimple) create = nullptr;
    decltype(&nvjpegDestroy) destroy = nullptr;
    decltype(&nvjpegJpegStateCreate) state_create = nullptr;
    decltype(&nvjpegJpegStateDestroy) state_destroy = nullptr;
    decltype(&nvjpegGetImageInfo) info = nullptr;
    decltype(&nvjpegDecode) decode = nullptr;
} nvj;

static bool load_nvjpeg();
static bool load_nvjpeg() {
    std::call_once(nvj.once, [] {
        // QL_NVJPEG (a path), then the loader's search path, then a copy beside the plugin
        // (`make cuda` puts the wheel's libnvjpeg there).
        if (const char *env = getenv("QL_NVJPEG")) nvj.lib = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        const char *names[] = {"libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so"};
        for (const char *n : names)
            if (!nvj.lib) nvj.lib = dlopen(n, RTLD_NOW | RTLD_LOCAL);
        Dl_info self;
        if (!nvj.lib && dladdr((void *)&load_nvjpeg, &self) && self.dli_fname) {
            std::string dir(self.dli_fname);
            dir = dir.substr(0, dir.find_last_of('/') + 1);
            nvj.lib = dlopen((dir + "libnvjpeg.so.13").c_str(), RTLD_NOW | RTLD_LOCAL);
        }
        if (!nvj.lib) return;
        nvj.create = (decltype(nvj.create))dlsym(nvj.lib, "nvjpegCreateSimple");
        nvj.destroy = (decltype(nvj.destroy))dlsym(nvj.lib, "nvjpegDestroy");
        nvj.state_create = (decltype(nvj.state_create))dlsym(nvj.lib, "nvjpegJpegStateCreate");
        nvj.state_destroy = (decltype(nvj.state_destroy))dlsym(nvj.lib, "nvjpegJpegStateDestroy");
        nvj.info = (decltype(nvj.info))dlsym(nvj.lib, "nvjpegGetImageInfo");
        nvj.decode = (decltype(nvj.decode))dlsym(nvj.lib, "nvjpegDecode");
    });
    return nvj.create && nvj.destroy && nvj.state_create && nvj.state_destroy && nvj.info && nvj.decode;
}

struct Decoder { nvjpegHandle_t handle; nvjpegJpegState_t state; };

static int jpeg_create(qlc_jpeg_decoder *out) {
    if (!load_nvjpeg()) return qlc_fail(QLC_EUNAVAILABLE, "nvJPEG not found (libnvjpeg.so.13/.12)");
    Decoder *d = new Decoder();
    if (nvj.create(&d->handle) != NVJPEG_STATUS_SUCCESS) { delete d; return qlc_fail(QLC_ECUDA, "nvjpegCreateSimple failed"); }
    if (nvj.state_create(d->handle, &d->state) != NVJPEG_STATUS_SUCCESS) {
        nvj.destroy(d->handle);
        delete d;
        return qlc_fail(QLC_ECUDA, "nvjpegJpegStateCreate failed");
    }
    *out = d;
    return QLC_OK;
}

static int jpeg_destroy(qlc_jpeg_decoder dec) {
    Decoder *d = (Decoder *)dec;
    if (!d) return QLC_OK;
    nvj.state_destroy(d->state);
    nvj.destroy(d->handle);
    delete d;
    return QLC_OK;
}

static int jpeg_decode(qlc_jpeg_decoder dec, qlc_stream s, const uint8_t *data, size_t size, uint8_t *rgb, size_t capacity,
                       int *width, int *height) {
    Decoder *d = (Decoder *)dec;
    if (!d || !data || !rgb) return qlc_fail(QLC_EINVAL, "jpeg_decode: null argument");
    int comps = 0, ws[NVJPEG_MAX_COMPONENT], hs[NVJPEG_MAX_COMPONENT];
    nvjpegChromaSubsampling_t sub;
    if (nvj.info(d->handle, data, size, &comps, &sub, ws, hs) != NVJPEG_STATUS_SUCCESS)
        return qlc_fail(QLC_EINVAL, "jpeg_decode: not a decodable JPEG");
    if ((size_t)ws[0] * hs[0] * 3 > capacity) return qlc_fail(QLC_EINVAL, "jpeg_decode: %dx%d image exceeds the buffer", ws[0], hs[0]);
    nvjpegImage_t img = {};
    img.channel[0] = rgb;
    img.pitch[0] = (size_t)ws[0] * 3;
    if (nvj.decode(d->handle, d->state, data, size, NVJPEG_OUTPUT_RGBI, &img, as_stream(s)) != NVJPEG_STATUS_SUCCESS)
        return qlc_fail(QLC_EINVAL, "jpeg_decode: nvjpegDecode failed (corrupt data?)");
    *width = ws[0];
    *height = hs[0];
    return QLC_OK;
}

void qlc_fill_preprocess(qlc_api *api) {
    api->resize_bilinear_u8 = resize_bilinear;
    api->u8hwc_to_f32chw = to_chw;
    api->jpeg_decoder_create = jpeg_create;
    api->jpeg_decoder_destroy = jpeg_destroy;
    api->jpeg_decode = jpeg_decode;
}
