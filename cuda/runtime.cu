// runtime.cu — device probe, memory, streams, events, errors, and the API table.
//
// Kernels in this plugin (one file each, every one checked against its CPU _ref by the GPU
// conformance suite in Tests/QuantLabTests/CUDATests.swift):
//   sgemm.cu        sgemm (v1 naive, v2 64x64 shared tiles, v3 128x128 tiles with 8x8 register
//                   blocking and double buffering)
//   igemm.cu        int8 GEMM (dp4a; tensor-core mma.sync on sm_80+) with the fused epilogue
//   cublas_peer.cu  cuBLAS opened at run time, the peer of `qlab bench --gpu` (not a kernel)
//   conv_quant.cu   im2col; fake quantization fwd/bwd per tensor and per channel;
//                   per-channel amax and |x| histogram (calibration reductions)
//   elementwise.cu  unary fwd/bwd, strided broadcasting binary, axpy, scale_shift,
//                   softmax rows, SGD and AdamW updates
//   preprocess.cu   bilinear resize, normalise + HWC->CHW (+flip), nvJPEG decode
//   engine.cu       the INT8 engine's activations: quantize, requantize, dequantize, int8
//                   im2col, max pooling, concat, scatter, NHWC -> NCHW (CUDAPlan.swift)
#include <stdarg.h>
#include <string.h>
#include "common.cuh"

static thread_local char last_error_buf[512] = "";

int qlc_fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error_buf, sizeof last_error_buf, fmt, ap);
    va_end(ap);
    return status;
}

int qlc_check_launch(const char *kernel) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return qlc_fail(QLC_ECUDA, "launch of %s: %s", kernel, cudaGetErrorString(e));
    return QLC_OK;
}

static const char *last_error(void) { return last_error_buf; }

static int device_info(qlc_device_info *info) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || (e == cudaSuccess && count == 0)) {
        cudaGetLastError(); // clear
        return qlc_fail(QLC_ENODEVICE, "%s", e == cudaErrorInsufficientDriver ? "no CUDA driver (cudaErrorInsufficientDriver)"
                                                                               : "no CUDA device");
    }
    if (e != cudaSuccess) return qlc_fail(QLC_ENODEVICE, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
    cudaDeviceProp p;
    QLC_TRY(cudaGetDeviceProperties(&p, 0));
    memset(info, 0, sizeof *info);
    strncpy(info->name, p.name, sizeof info->name - 1);
    info->sm_count = p.multiProcessorCount;
    info->cc_major = p.major;
    info->cc_minor = p.minor;
    info->total_memory = p.totalGlobalMem;
    cudaDriverGetVersion(&info->driver_version);
    cudaRuntimeGetVersion(&info->runtime_version);
    return QLC_OK;
}

static int dmalloc(void **ptr, size_t bytes) { QLC_TRY(cudaMalloc(ptr, bytes ? bytes : 1)); return QLC_OK; }
static int dfree(void *ptr) { QLC_TRY(cudaFree(ptr)); return QLC_OK; }
static int h2d(void *d, const void *h, size_t n, qlc_stream s) { QLC_TRY(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, as_stream(s))); return QLC_OK; }
static int d2h(void *h, const void *d, size_t n, qlc_stream s) { QLC_TRY(cudaMemcpyAsync(h, d, n, cudaMemcpyDeviceToHost, as_stream(s))); return QLC_OK; }
static int d2d(void *d, const void *src, size_t n, qlc_stream s) { QLC_TRY(cudaMemcpyAsync(d, src, n, cudaMemcpyDeviceToDevice, as_stream(s))); return QLC_OK; }
static int dmemset(void *p, int v, size_t n, qlc_stream s) { QLC_TRY(cudaMemsetAsync(p, v, n, as_stream(s))); return QLC_OK; }
static int stream_create(qlc_stream *s) { cudaStream_t st; QLC_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking)); *s = st; return QLC_OK; }
static int stream_destroy(qlc_stream s) { QLC_TRY(cudaStreamDestroy(as_stream(s))); return QLC_OK; }
static int stream_sync(qlc_stream s) { QLC_TRY(cudaStreamSynchronize(as_stream(s))); return QLC_OK; }
static int device_sync(void) { QLC_TRY(cudaDeviceSynchronize()); return QLC_OK; }
static int event_create(qlc_event *e) { cudaEvent_t ev; QLC_TRY(cudaEventCreate(&ev)); *e = ev; return QLC_OK; }
static int event_destroy(qlc_event e) { QLC_TRY(cudaEventDestroy((cudaEvent_t)e)); return QLC_OK; }
static int event_record(qlc_event e, qlc_stream s) { QLC_TRY(cudaEventRecord((cudaEvent_t)e, as_stream(s))); return QLC_OK; }
static int event_elapsed(float *ms, qlc_event a, qlc_event b) {
    QLC_TRY(cudaEventSynchronize((cudaEvent_t)b));
    QLC_TRY(cudaEventElapsedTime(ms, (cudaEvent_t)a, (cudaEvent_t)b));
    return QLC_OK;
}

void qlc_fill_runtime(qlc_api *api) {
    api->device_info = device_info;
    api->last_error = last_error;
    api->malloc = dmalloc;
    api->free = dfree;
    api->memcpy_h2d = h2d;
    api->memcpy_d2h = d2h;
    api->memcpy_d2d = d2d;
    api->memset = dmemset;
    api->stream_create = stream_create;
    api->stream_destroy = stream_destroy;
    api->stream_synchronize = stream_sync;
    api->device_synchronize = device_sync;
    api->event_create = event_create;
    api->event_destroy = event_destroy;
    api->event_record = event_record;
    api->event_elapsed_ms = event_elapsed;
}

extern "C" __attribute__((visibility("default"))) const qlc_api *qlc_get_api(int abi_version) {
    static qlc_api api;
    static bool filled = false;
    if (abi_version != QLC_ABI_VERSION) return NULL;
    if (!filled) { // first call happens before any concurrent use (the Swift side loads once)
        memset(&api, 0, sizeof api);
        qlc_fill_runtime(&api);
        qlc_fill_sgemm(&api);
        qlc_fill_igemm(&api);
        qlc_fill_cublas_peer(&api);
        qlc_fill_conv_quant(&api);
        qlc_fill_elementwise(&api);
        qlc_fill_preprocess(&api);
        qlc_fill_engine(&api);
        filled = true;
    }
    return &api;
}
