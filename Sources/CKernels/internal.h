/* Private helpers shared by the kernel files; not part of the ABI. */
#ifndef QUANTLAB_CKERNELS_INTERNAL_H
#define QUANTLAB_CKERNELS_INTERNAL_H
#include "ckernels.h"

/* Run fn(task, ctx) for task in [0, ntasks) on the persistent pool; the caller thread takes
 * part. Blocks until every task is done. Nested calls (from inside a task) run serially. */
typedef void (*ql_task_fn)(int task, void *ctx);
void ql_parallel_for(int ntasks, ql_task_fn fn, void *ctx);

/* Resolve QL_ISA_BEST and check support: returns the concrete level or -1. */
int ql_resolve_isa(ql_isa isa);

/* 64-byte aligned scratch; NULL on failure. */
void *ql_aligned_alloc(size_t bytes);
void ql_aligned_free(void *p);

/* A scratch buffer that grows on demand and is kept for reuse (declare it _Thread_local so
 * each worker has its own). Returns the buffer with at least `bytes`, or NULL when the
 * allocation fails (the old contents are not preserved). */
typedef struct {
    void *ptr;
    size_t bytes;
} ql_scratch;
void *ql_scratch_reserve(ql_scratch *s, size_t bytes);

/* Serial SGEMM on one thread (used inside parallel regions). Same contract as ql_sgemm. */
void ql_sgemm_serial(int isa, int transA, int transB, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C,
                     int ldc);

/* The INT8 epilogue of a block of int32 accumulators (rows x ncols, row stride ldacc) for rows
 * m0.. and columns n0.. of the output (int8 codes when to_s8, else floats; row stride ldo), with
 * ep's per-column arrays read from n0: the one call the GEMM (igemm.c) and the direct conv
 * (iconv.c) share. Returns the epilogue's status. */
int ql_epilogue_block(int isa, int to_s8, void *out, int ldo, int m0, int n0, int rows, int ncols,
                      const int32_t *acc, int ldacc, const ql_requant_params *ep);

static inline int ql_min_i(int a, int b) { return a < b ? a : b; }

#include <math.h>

/* TensorRT's symmetric quantization of one value: code = clamp(round_half_to_even(x / s),
 * -lim, lim). The one definition behind the fake quantizer and the engine's int8 tensors, so
 * their codes agree bit for bit (nearbyintf rounds half to even in the default mode). */
static inline float ql_code(float x, float s, float lim) {
    float q = nearbyintf(x / s);
    return q > lim ? lim : (q < -lim ? -lim : q);
}

/* The logistic function without overflow for large |x|; SiLU is x * this (one definition for
 * the elementwise op and the INT8 epilogue, so that both compute the same floats). */
static inline float sigmoidf_stable(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}
static inline int ql_max_i(int a, int b) { return a > b ? a : b; }
#endif
