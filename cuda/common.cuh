// Shared helpers of the CUDA plugin (not part of the ABI).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include "qlcuda.h"

// Records the failure for qlc_last_error() (per host thread) and returns the status.
int qlc_fail(int status, const char *fmt, ...);
int qlc_check_launch(const char *kernel);

#define QLC_TRY(call)                                                                              \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return qlc_fail(QLC_ECUDA, "%s: %s", #call, cudaGetErrorString(e_)); \
    } while (0)

static inline cudaStream_t as_stream(qlc_stream s) { return (cudaStream_t)s; }
static inline unsigned blocks_for(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 65535LL * 1024 ? 65535LL * 1024 : (b < 1 ? 1 : b));
}

// Grid for grid-stride loops: enough blocks of 256 to cover n, at most 4096.
static inline unsigned grid(int64_t n) { unsigned b = blocks_for(n, 256); return b > 4096 ? 4096 : b; }

// Each .cu file fills its part of the API table.
void qlc_fill_runtime(qlc_api *api);
void qlc_fill_sgemm(qlc_api *api);
void qlc_fill_igemm(qlc_api *api);
void qlc_fill_cublas_peer(qlc_api *api);
void qlc_fill_conv_quant(qlc_api *api);
void qlc_fill_elementwise(qlc_api *api);
void qlc_fill_preprocess(qlc_api *api);
void qlc_fill_engine(qlc_api *api);
