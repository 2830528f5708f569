// sgemm.cu — the GPU twin of ql_sgemm (row-major, transposes, alpha/beta; contract in ckernels.h).
//
// Three versions, each selectable through sgemm_ex so the conformance suite checks every one
// against ql_sgemm_ref and the GPU bench shows what each step buys:
//   v1 naive:   one thread per C element, the K loop from global memory. The spec on the GPU.
//   v2 tiled:   a 64x64 C tile per 16x16-thread block; 64x16 A and 16x64 B tiles staged in
//               shared memory; each thread keeps a 4x4 register tile (rows ty+16r, cols tx+16c).
//               ~0.33x cuBLAS on an H100: each FMA needs a shared-memory load per operand pair.
//   v3 reg128:  a 128x128 C tile per 256-thread block, 8x8 outputs per thread, so each k step
//               does 64 FMAs for 4 float4 shared loads; k tiles of 8 staged in two shared
//               buffers (the next tile's global loads are in registers while this one is
//               multiplied: one barrier per tile); float4 global loads and stores wherever the
//               address is 16-byte aligned and the four elements are in range, scalar otherwise,
//               so any shape, leading dimension and transpose is correct; blocks ordered in
//               bands of 8 block rows for L2 reuse. The default.
#include "common.cuh"

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

#define T2 64
#define T2K 16

__global__ void __launch_bounds__(256) sgemm_tiled(int transA, int transB, int M, int N, int K, float alpha,
                                                    const float *A, int lda, const float *B, int ldb, float beta,
                                                    float *C, int ldc) {
    __shared__ float As[T2K][T2 + 1];
    __shared__ float Bs[T2K][T2 + 1];
    int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    int i0 = blockIdx.y * T2, j0 = blockIdx.x * T2;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += T2K) {
        for (int e = tid; e < T2 * T2K; e += 256) {
            int r = e / T2K, kk = e % T2K; // A tile: 64 rows x 16 k
            As[kk][r] = load_a(A, lda, transA, M, K, i0 + r, k0 + kk);
            int kb = e / T2, c = e % T2; // B tile: 16 k x 64 cols
            Bs[kb][c] = load_b(B, ldb, transB, K, N, k0 + kb, j0 + c);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < T2K; kk++) {
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

// ---- v3 -----------------------------------------------------------------------------------
#define T3 128
#define T3K 8
#define T3LD (T3 + 4) // shared row length: float4-aligned, and the transposed scalar stores of
                      // 16 rows x 2 k per warp fall in 32 different banks

// Four consecutive elements of a row-major matrix (rows x cols, leading dimension ld) from
// (row, col) along the row; zero outside. One float4 load when all four are in range and the
// address is 16-byte aligned.
__device__ __forceinline__ float4 load4(const float *base, int ld, int rows, int cols, int row, int col) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row >= rows) return v;
    const float *p = base + (size_t)row * ld + col;
    if (col + 3 < cols && ((uintptr_t)p & 15) == 0) return __ldg(reinterpret_cast<const float4 *>(p));
    if (col < cols) v.x = __ldg(p);
    if (col + 1 < cols) v.y = __ldg(p + 1);
    if (col + 2 < cols) v.z = __ldg(p + 2);
    if (col + 3 < cols) v.w = __ldg(p + 3);
    return v;
}

template <bool TA, bool TB>
__global__ void __launch_bounds__(256) sgemm_reg128(int M, int N, int K, float alpha, const float *A, int lda,
                                                     const float *B, int ldb, float beta, float *C, int ldc) {
    __shared__ __align__(16) float As[2][T3K][T3LD];
    __shared__ __align__(16) float Bs[2][T3K][T3LD];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    // grouped rasterization (as igemm.cu): bands of 8 block rows, so B's columns stay in L2
    const int tiles_m = (M + T3 - 1) / T3, tiles_n = (N + T3 - 1) / T3, bid = blockIdx.x;
    const int band = bid / (8 * tiles_n), first = band * 8, rows = min(tiles_m - first, 8);
    const int i0 = (first + bid % rows) * T3, j0 = (bid % (8 * tiles_n)) / rows * T3;
    // Which four elements of each tile this thread moves: along k for a row-major operand read
    // by rows (then stored transposed, k-major), along i/j for one stored k-major already.
    const int a_row = TA ? tid >> 5 : tid >> 1, a_col = TA ? (tid & 31) * 4 : (tid & 1) * 4;
    const int b_row = TB ? tid >> 1 : tid >> 5, b_col = TB ? (tid & 1) * 4 : (tid & 31) * 4;
    auto fetch_a = [&](int k0) {
        return TA ? load4(A, lda, K, M, k0 + a_row, i0 + a_col) : load4(A, lda, M, K, i0 + a_row, k0 + a_col);
    };
    auto fetch_b = [&](int k0) {
        return TB ? load4(B, ldb, N, K, j0 + b_row, k0 + b_col) : load4(B, ldb, K, N, k0 + b_row, j0 + b_col);
    };
    auto stash = [&](int s, float4 a, float4 b) {
        if (TA) *reinterpret_cast<float4 *>(&As[s][a_row][a_col]) = a;
        else { As[s][a_col][a_row] = a.x; As[s][a_col + 1][a_row] = a.y; As[s][a_col + 2][a_row] = a.z; As[s][a_col + 3][a_row] = a.w; }
        if (TB) { Bs[s][b_col][b_row] = b.x; Bs[s][b_col + 1][b_row] = b.y; Bs[s][b_col + 2][b_row] = b.z; Bs[s][b_col + 3][b_row] = b.w; }
        else *reinterpret_cast<float4 *>(&Bs[s][b_row][b_col]) = b;
    };

    float acc[8][8];
#pragma unroll
    for (int r = 0; r < 8; r++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[r][c] = 0.0f;

    const int tiles = (K + T3K - 1) / T3K;
    stash(0, fetch_a(0), fetch_b(0));
    __syncthreads();
    for (int t = 0; t < tiles; t++) {
        const int s = t & 1;
        float4 na, nb;
        if (t + 1 < tiles) { na = fetch_a((t + 1) * T3K); nb = fetch_b((t + 1) * T3K); }
#pragma unroll
        for (int kk = 0; kk < T3K; kk++) {
            float4 a0 = *reinterpret_cast<const float4 *>(&As[s][kk][ty * 4]);
            float4 a1 = *reinterpret_cast<const float4 *>(&As[s][kk][64 + ty * 4]);
            float4 b0 = *reinterpret_cast<const float4 *>(&Bs[s][kk][tx * 4]);
            float4 b1 = *reinterpret_cast<const float4 *>(&Bs[s][kk][64 + tx * 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int r = 0; r < 8; r++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
        }
        if (t + 1 < tiles) stash(s ^ 1, na, nb);
        __syncthreads();
    }
    // Rows ty*4 + {0..3} and 64 + ty*4 + {0..3}; columns likewise with tx.
#pragma unroll
    for (int r = 0; r < 8; r++) {
        const int i = i0 + (r < 4 ? ty * 4 + r : 64 + ty * 4 + r - 4);
        if (i >= M) continue;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int j = j0 + h * 64 + tx * 4;
            float *p = C + (size_t)i * ldc + j;
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; e++) v[e] = alpha * acc[r][h * 4 + e];
            if (beta == 0.0f && j + 3 < N && ((uintptr_t)p & 15) == 0) {
                *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (j + e < N) p[e] = beta == 0.0f ? v[e] : v[e] + beta * p[e];
            }
        }
    }
}

__global__ void scale_c(float *C, int ldc, int M, int N, float beta) {
    int i = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < M && j < N) C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
}

static int sgemm_ex(qlc_stream s, int kernel, int transA, int transB, int M, int N, int K, float alpha,
                    const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (M < 0 || N < 0 || K < 0 || ldc < (N > 1 ? N : 1) || lda < ((transA ? M : K) > 1 ? (transA ? M : K) : 1) ||
        ldb < ((transB ? K : N) > 1 ? (transB ? K : N) : 1))
        return qlc_fail(QLC_EINVAL, "sgemm: inconsistent sizes");
    if (kernel != QLC_KERNEL_AUTO && kernel != QLC_SGEMM_NAIVE && kernel != QLC_SGEMM_TILED && kernel != QLC_SGEMM_REG128)
        return qlc_fail(QLC_EINVAL, "sgemm: unknown kernel %d", kernel);
    if (M == 0 || N == 0) return QLC_OK;
    if (K == 0 || alpha == 0.0f) {
        scale_c<<<dim3((N + 255) / 256, M), 256, 0, as_stream(s)>>>(C, ldc, M, N, beta);
        return qlc_check_launch("scale_c");
    }
    if (kernel == QLC_KERNEL_AUTO) kernel = (double)M * N * K < 32768.0 ? QLC_SGEMM_NAIVE : QLC_SGEMM_REG128;
    cudaStream_t st = as_stream(s);
    if (kernel == QLC_SGEMM_NAIVE) {
        sgemm_naive<<<dim3((N + 15) / 16, (M + 15) / 16), dim3(16, 16), 0, st>>>(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return qlc_check_launch("sgemm_naive");
    }
    if (kernel == QLC_SGEMM_TILED) {
        sgemm_tiled<<<dim3((N + T2 - 1) / T2, (M + T2 - 1) / T2), dim3(16, 16), 0, st>>>(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return qlc_check_launch("sgemm_tiled");
    }
    const unsigned g = (unsigned)(((N + T3 - 1) / T3) * ((M + T3 - 1) / T3));
    if (!transA && !transB) sgemm_reg128<false, false><<<g, 256, 0, st>>>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else if (transA && !transB) sgemm_reg128<true, false><<<g, 256, 0, st>>>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else if (!transA && transB) sgemm_reg128<false, true><<<g, 256, 0, st>>>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else sgemm_reg128<true, true><<<g, 256, 0, st>>>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return qlc_check_launch("sgemm_reg128");
}

static int sgemm(qlc_stream s, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    return sgemm_ex(s, QLC_KERNEL_AUTO, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void qlc_fill_sgemm(qlc_api *api) {
    api->sgemm = sgemm;
    api->sgemm_ex = sgemm_ex;
}
