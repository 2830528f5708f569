// cublas_peer.cu — cuBLAS as the benchmark peer of our GEMMs (qlab bench --gpu), opened at run
// time like nvJPEG: the plugin never links it, and a machine without it reports so.
//
// Search order: $QL_CUBLAS (a file), then libcublas.so.13, .so.12, .so.11, .so on the loader's
// path. The few entry points used are declared here (C ABI, stable since CUDA 11), so
// building the plugin needs no cuBLAS headers.
//   FP32: cublasSgemm with the default math mode (CUBLAS_DEFAULT_MATH: no TF32), i.e. the
//         same arithmetic as our SGEMM.
//   INT8: cublasGemmEx s8 x s8 -> s32 with CUBLAS_COMPUTE_32I in the "TN" layout cuBLAS's
//         integer tensor-core kernels want (row-major A times the N x K weights transposed:
//         the layout of our packed weights), so the peer gets its best case.
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include "common.cuh"

typedef int (*cublasCreate_fn)(void **);
typedef int (*cublasSetMathMode_fn)(void *, int);
typedef int (*cublasSetStream_fn)(void *, cudaStream_t);
typedef int (*cublasGetVersion_fn)(void *, int *);
typedef int (*cublasSgemm_fn)(void *, int, int, int, int, int, const float *, const float *, int, const float *, int,
                              const float *, float *, int);
typedef int (*cublasGemmEx_fn)(void *, int, int, int, int, int, const void *, const void *, int, int, const void *, int,
                               int, const void *, void *, int, int, int, int);

enum { OP_N = 0, OP_T = 1, R_32F = 0, R_8I = 3, R_32I = 10, COMPUTE_32I = 72, GEMM_DEFAULT = -1, DEFAULT_MATH = 0 };

static struct {
    bool tried;
    void *handle;
    cublasSetStream_fn set_stream;
    cublasSgemm_fn sgemm;
    cublasGemmEx_fn gemm_ex;
    char description[512];
} peer;

static int cublas_open(char *description, int capacity) {
    if (!peer.tried) {
        peer.tried = true;
        const char *env = getenv("QL_CUBLAS");
        const char *names[] = {env, "libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"};
        void *lib = NULL;
        const char *found = NULL;
        for (const char *name : names)
            if (name && (lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) { found = name; break; }
        if (!lib) {
            snprintf(peer.description, sizeof peer.description,
                     "cuBLAS not found (set QL_CUBLAS to libcublas.so, or pip install nvidia-cublas)");
        } else {
            auto create = (cublasCreate_fn)dlsym(lib, "cublasCreate_v2");
            auto math = (cublasSetMathMode_fn)dlsym(lib, "cublasSetMathMode");
            auto version = (cublasGetVersion_fn)dlsym(lib, "cublasGetVersion_v2");
            peer.set_stream = (cublasSetStream_fn)dlsym(lib, "cublasSetStream_v2");
            peer.sgemm = (cublasSgemm_fn)dlsym(lib, "cublasSgemm_v2");
            peer.gemm_ex = (cublasGemmEx_fn)dlsym(lib, "cublasGemmEx");
            void *h = NULL;
            int v = 0;
            if (!create || !math || !peer.set_stream || !peer.sgemm || !peer.gemm_ex || create(&h) != 0 || math(h, DEFAULT_MATH) != 0) {
                snprintf(peer.description, sizeof peer.description, "%s loaded but unusable (missing symbols or cublasCreate failed)", found);
            } else {
                if (version) version(h, &v);
                peer.handle = h;
                snprintf(peer.description, sizeof peer.description, "cuBLAS %d.%d.%d (%s)", v / 10000, v / 100 % 100, v % 100, found);
            }
        }
    }
    if (description && capacity > 0) snprintf(description, (size_t)capacity, "%s", peer.description);
    return peer.handle ? QLC_OK : qlc_fail(QLC_EUNAVAILABLE, "%s", peer.description);
}

// Row-major C (M x N) = A (M x K) B (K x N) is column-major C^T = B^T A^T.
static int cublas_sgemm(qlc_stream s, int M, int N, int K, const float *A, const float *B, float *C) {
    if (int st = cublas_open(NULL, 0)) return st;
    if (M <= 0 || N <= 0 || K <= 0) return qlc_fail(QLC_EINVAL, "cublas_sgemm: sizes must be positive");
    const float one = 1.0f, zero = 0.0f;
    peer.set_stream(peer.handle, as_stream(s));
    int st = peer.sgemm(peer.handle, OP_N, OP_N, N, M, K, &one, B, N, A, K, &zero, C, N);
    return st == 0 ? QLC_OK : qlc_fail(QLC_ECUDA, "cublasSgemm: status %d", st);
}

// Row-major C (M x N) = A (M x K) Bt^T, Bt = N x K: column-major C^T = (Bt as K x N)^T A^T.
static int cublas_igemm(qlc_stream s, int M, int N, int K, const int8_t *A, const int8_t *Bt, int32_t *C) {
    if (int st = cublas_open(NULL, 0)) return st;
    if (M <= 0 || N <= 0 || K <= 0 || K % 4 || N % 4) return qlc_fail(QLC_EINVAL, "cublas_igemm: sizes must be positive, K and N multiples of 4");
    const int32_t one = 1, zero = 0;
    peer.set_stream(peer.handle, as_stream(s));
    int st = peer.gemm_ex(peer.handle, OP_T, OP_N, N, M, K, &one, Bt, R_8I, K, A, R_8I, K, &zero, C, R_32I, N, COMPUTE_32I, GEMM_DEFAULT);
    return st == 0 ? QLC_OK : qlc_fail(QLC_ECUDA, "cublasGemmEx (int8): status %d", st);
}

void qlc_fill_cublas_peer(qlc_api *api) {
    api->cublas_open = cublas_open;
    api->cublas_sgemm = cublas_sgemm;
    api->cublas_igemm = cublas_igemm;
}
