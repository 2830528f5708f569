// gemm.cu — SGEMM and INT8 GEMM twins of ql_sgemm / ql_igemm_* (contracts in ckernels.h).
//
// SGEMM versions:
//   v1 sgemm_naive:  one thread per C element, K loop from global memory. The spec on the GPU.
//   v2 sgemm_tiled:  64x64 C tile per 16x16-thread block; 64x16 A and 16x64 B tiles staged in
//                    shared memory; each thread keeps a 4x4 register tile (rows ty+16r, cols
//                    tx+16c, so loads and stores are coalesced). Used for all but tiny shapes.
// INT8 GEMM:
//   igemm_dp4a:      same 64x64 tiling; the packed weights are [N][Kp] bytes = [N][Kp/4] int32
//                    words, A rows are read as words of 4 u8 (zero beyond K); `dp4a.u32.s32`
//                    adds four u8 x s8 products into an int32 accumulator, exactly. Epilogue
//                    fused: int32 out, or requantize to int8, or dequantize to float, with
//                    fmaf and __float2int_rn (round half to even) so results are bit-exact
//                    against the CPU reference.
#include "common.cuh"

#define TILE 64
#define TK 16
#define TKQ 8 // int32 words of k per INT8 tile step (32 k)

__device__ __forceinline__ float load_a(const float *A, int lda, int transA, int M, int K, int i, int k) {
    if (i >= M || k >= K) return 0.0f;
    return transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
}
__device__ __forceinline__ float load_b(const float *B, int ldb, int transB, int K, int N, int k, int j) {
    if (k >= K || j >= N) return 0.0f;
    return transB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
}

__global__ void sgemm_naive(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                            const float *B, int ldb, float beta, float *C, int ldc) {
    int i = blockIdx.y * blockDim.y + threadIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M || j >= N) return;
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc += load_a(A, lda, transA, M, K, i, k) * load_b(B, ldb, transB, K, N, k, j);
    float *c = &C[(size_t)i * ldc + j];
    *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
}

__global__ void __launch_bounds__(256) sgemm_tiled(int transA, int transB, int M, int N, int K, float alpha,
                                                    const float *A, int lda, const float *B, int ldb, float beta,
                                                    float *C, int ldc) {
    __shared__ float As[TK][TILE + 1];
    __shared__ float Bs[TK][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = tid; e < TILE * TK; e += 256) {
            int r = e / TK, kk = e % TK; // A tile: 64 rows x 16 k
            As[kk][r] = load_a(A, lda, transA, M, K, i0 + r, k0 + kk);
            int kb = e / TILE, c = e % TILE; // B tile: 16 k x 64 cols
            Bs[kb][c] = load_b(B, ldb, transB, K, N, k0 + kb, j0 + c);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; r++) a[r] = As[kk][ty + 16 * r];
#pragma unroll
            for (int c = 0; c < 4; c++) b[c] = Bs[kk][tx + 16 * c];
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[r][c] += a[r] * b[c];
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = i0 + ty + 16 * r, j = j0 + tx + 16 * c;
            if (i < M && j < N) {
                float *p = &C[(size_t)i * ldc + j];
                *p = beta == 0.0f ? alpha * acc[r][c] : alpha * acc[r][c] + beta * *p;
            }
        }
}

__global__ void scale_c(float *C, int ldc, int M, int N, float beta) {
    int i = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < M && j < N) C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
}

static int sgemm(qlc_stream s, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    if (M < 0 || N < 0 || K < 0 || ldc < (N > 1 ? N : 1) || lda < ((transA ? M : K) > 1 ? (transA ? M : K) : 1) ||
        ldb < ((transB ? K : N) > 1 ? (transB ? K : N) : 1))
        return qlc_fail(QLC_EINVAL, "sgemm: inconsistent sizes");
    if (M == 0 || N == 0) return QLC_OK;
    if (K == 0 || alpha == 0.0f) {
        scale_c<<<dim3((N + 255) / 256, M), 256, 0, as_stream(s)>>>(C, ldc, M, N, beta);
        return qlc_check_launch("scale_c");
    }
    if ((double)M * N * K < 32768.0) {
        sgemm_naive<<<dim3((N + 15) / 16, (M + 15) / 16), dim3(16, 16), 0, as_stream(s)>>>(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return qlc_check_launch("sgemm_naive");
    }
    sgemm_tiled<<<dim3((N + TILE - 1) / TILE, (M + TILE - 1) / TILE), dim3(16, 16), 0, as_stream(s)>>>(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return qlc_check_launch("sgemm_tiled");
}

// ---- INT8 --------------------------------------------------------------------------------
__host__ __device__ static inline int kquads(int K) { return (K + 3) / 4; }

static size_t igemm_packed_size(int K, int N) { return K < 0 || N < 0 ? 0 : (size_t)N * kquads(K) * 4; }

__global__ void pack_b_kernel(int32_t *packed, const int8_t *B, int ldb, int K, int N) {
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int Kq = kquads(K);
    if (t >= (int64_t)N * Kq) return;
    int n = (int)(t / Kq), q = (int)(t % Kq);
    uint32_t w = 0;
    for (int r = 0; r < 4; r++) {
        int k = 4 * q + r;
        uint8_t byte = k < K ? (uint8_t)B[(size_t)k * ldb + n] : 0;
        w |= (uint32_t)byte << (8 * r);
    }
    packed[t] = (int32_t)w;
}

__global__ void col_sum_kernel(int32_t *col_sum, const int8_t *B, int ldb, int K, int N) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int32_t s = 0;
    for (int k = 0; k < K; k++) s += B[(size_t)k * ldb + n];
    col_sum[n] = s;
}

static int igemm_pack_b(qlc_stream s, void *packed, int32_t *col_sum, const int8_t *B, int ldb, int K, int N) {
    if (K < 0 || N < 0 || ldb < (N > 1 ? N : 1)) return qlc_fail(QLC_EINVAL, "igemm_pack_b: inconsistent sizes");
    int64_t words = (int64_t)N * kquads(K);
    if (words > 0) {
        pack_b_kernel<<<blocks_for(words, 256), 256, 0, as_stream(s)>>>((int32_t *)packed, B, ldb, K, N);
        if (int st = qlc_check_launch("pack_b")) return st;
    }
    if (col_sum && N > 0) {
        col_sum_kernel<<<blocks_for(N, 256), 256, 0, as_stream(s)>>>(col_sum, B, ldb, K, N);
        return qlc_check_launch("col_sum");
    }
    return QLC_OK;
}

__device__ __forceinline__ int dp4a_us(uint32_t a, int32_t b, int32_t c) {
    int32_t d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

enum { OUT_S32 = 0, OUT_S8 = 1, OUT_F32 = 2 };

__device__ __forceinline__ float epilogue_value(int32_t acc, int n, const qlc_requant_params &p) {
    int32_t off = p.col_offset ? p.col_offset[n] : 0;
    float v = fmaf(__int2float_rn(acc + off), p.scale[n], p.bias ? p.bias[n] : 0.0f);
    return p.relu && v < 0.0f ? 0.0f : v;
}

__device__ __forceinline__ int8_t requant(float v) {
    int q = __float2int_rn(v); // round half to even
    return (int8_t)(q > 127 ? 127 : (q < -127 ? -127 : q));
}

__global__ void __launch_bounds__(256) igemm_dp4a(int M, int N, int K, const uint8_t *A, int lda,
                                                   const int32_t *Bw, int mode, void *out, int ldo,
                                                   qlc_requant_params p) {
    __shared__ uint32_t As[TILE][TKQ + 1];
    __shared__ int32_t Bs[TILE][TKQ + 1];
    int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE, Kq = kquads(K);
    int32_t acc[4][4] = {};
    for (int q0 = 0; q0 < Kq; q0 += TKQ) {
        for (int e = tid; e < TILE * TKQ; e += 256) {
            int r = e / TKQ, q = e % TKQ, i = i0 + r, k = 4 * (q0 + q);
            uint32_t w = 0;
            if (i < M)
                for (int b = 0; b < 4; b++)
                    if (k + b < K) w |= (uint32_t)A[(size_t)i * lda + k + b] << (8 * b);
            As[r][q] = w;
            int j = j0 + r;
            Bs[r][q] = (j < N && q0 + q < Kq) ? Bw[(size_t)j * Kq + q0 + q] : 0;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < TKQ; q++)
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int c = 0; c < 4; c++) acc[r][c] = dp4a_us(As[ty + 16 * r][q], Bs[tx + 16 * c][q], acc[r][c]);
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = i0 + ty + 16 * r, j = j0 + tx + 16 * c;
            if (i >= M || j >= N) continue;
            size_t o = (size_t)i * ldo + j;
            if (mode == OUT_S32) ((int32_t *)out)[o] = acc[r][c];
            else if (mode == OUT_S8) ((int8_t *)out)[o] = requant(epilogue_value(acc[r][c], j, p));
            else ((float *)out)[o] = epilogue_value(acc[r][c], j, p);
        }
}

static int igemm_run(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed, int mode,
                     void *out, int ldo, const qlc_requant_params *hp) {
    if (M < 0 || N < 0 || K < 0 || lda < (K > 1 ? K : 1) || ldo < (N > 1 ? N : 1))
        return qlc_fail(QLC_EINVAL, "igemm: inconsistent sizes");
    if (mode != OUT_S32 && (!hp || !hp->scale)) return qlc_fail(QLC_EINVAL, "igemm: epilogue needs scale");
    if (M == 0 || N == 0) return QLC_OK;
    qlc_requant_params p = hp ? *hp : qlc_requant_params{};
    igemm_dp4a<<<dim3((N + TILE - 1) / TILE, (M + TILE - 1) / TILE), dim3(16, 16), 0, as_stream(s)>>>(
        M, N, K, A, lda, (const int32_t *)packed, mode, out, ldo, p);
    return qlc_check_launch("igemm_dp4a");
}

static int igemm_s32(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed, int32_t *C, int ldc) {
    return igemm_run(s, M, N, K, A, lda, packed, OUT_S32, C, ldc, NULL);
}
static int igemm_s8(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                    const qlc_requant_params *hp, int8_t *out, int ldo) {
    return igemm_run(s, M, N, K, A, lda, packed, OUT_S8, out, ldo, hp);
}
static int igemm_f32(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     const qlc_requant_params *hp, float *out, int ldo) {
    return igemm_run(s, M, N, K, A, lda, packed, OUT_F32, out, ldo, hp);
}

__global__ void epilogue_kernel(int M, int N, int mode, void *out, int ldo, const int32_t *acc, int ldacc, qlc_requant_params p) {
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (int64_t)M * N) return;
    int i = (int)(t / N), j = (int)(t % N);
    float v = epilogue_value(acc[(size_t)i * ldacc + j], j, p);
    if (mode == OUT_S8) ((int8_t *)out)[(size_t)i * ldo + j] = requant(v);
    else ((float *)out)[(size_t)i * ldo + j] = v;
}

static int epilogue(qlc_stream s, int M, int N, int mode, void *out, int ldo, const int32_t *acc, int ldacc,
                    const qlc_requant_params *hp) {
    if (M < 0 || N < 0 || ldo < (N > 1 ? N : 1) || ldacc < (N > 1 ? N : 1) || !hp || !hp->scale)
        return qlc_fail(QLC_EINVAL, "epilogue: inconsistent arguments");
    if ((int64_t)M * N == 0) return QLC_OK;
    epilogue_kernel<<<blocks_for((int64_t)M * N, 256), 256, 0, as_stream(s)>>>(M, N, mode, out, ldo, acc, ldacc, *hp);
    return qlc_check_launch("epilogue");
}
static int requantize_s8(qlc_stream s, int M, int N, int8_t *out, int ldo, const int32_t *acc, int ldacc, const qlc_requant_params *hp) {
    return epilogue(s, M, N, OUT_S8, out, ldo, acc, ldacc, hp);
}
static int dequantize_f32(qlc_stream s, int M, int N, float *out, int ldo, const int32_t *acc, int ldacc, const qlc_requant_params *hp) {
    return epilogue(s, M, N, OUT_F32, out, ldo, acc, ldacc, hp);
}

void qlc_fill_gemm(qlc_api *api) {
    api->sgemm = sgemm;
    api->igemm_packed_size = igemm_packed_size;
    api->igemm_pack_b = igemm_pack_b;
    api->igemm_u8s8s32 = igemm_s32;
    api->igemm_u8s8_s8 = igemm_s8;
    api->igemm_u8s8_f32 = igemm_f32;
    api->requantize_s8 = requantize_s8;
    api->dequantize_f32 = dequantize_f32;
}
