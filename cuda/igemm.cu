// igemm.cu — the GPU twins of ql_igemm_* (u8 activations x s8 weights -> exact int32, with the
// fused requantization epilogue; contracts in ckernels.h and qlcuda.h).
//
// Weights are packed once: [N][Kp] bytes, Kp = K rounded up to 32 and zero-padded, i.e. each
// output channel's K weights contiguous (the "col" operand of mma, and 4-byte words for dp4a).
// Two kernels, selectable through igemm_ex and both bit-exact against the CPU reference:
//   dp4a:  64x64 C tile per 16x16-thread block, A rows read as words of 4 u8 (zero beyond K),
//          `dp4a.u32.s32` adds four u8 x s8 products into an int32. Any sm_61+ GPU; the
//          reference for the tensor-core kernel and the kernel used on sm_75.
//   imma:  tensor cores, `mma.sync.m16n8k32.row.col.s32.u8.s8.s32` (sm_80+). A 128x128 C tile
//          per block of 8 warps, each warp 64x32 (4x4 mma tiles, 64 int32 accumulators per
//          thread); k tiles of 64 bytes in a ring of shared-memory stages (2 by default),
//          filled with cp.async (16-byte copies, zero-filled past M, N, K) ahead of the tile
//          being multiplied. imma-wide: 128x256 tiles, 64x64 per warp, 3 stages.
//          Shared rows are 80 bytes: 16-byte aligned for cp.async, and the fragment loads of
//          a warp (8 rows x 4 words) land in 32 different banks. When A's rows are not 16-byte
//          aligned or K is not a multiple of 16, A is staged through registers instead.
// Epilogue (both): int32 out, or fmaf(acc + col_offset, scale, bias) [ReLU or SiLU] to float, or that
// rounded half-to-even (__float2int_rn) and clamped to [-127, 127] -- the CPU's arithmetic.
#include <string.h>
#include "common.cuh"
#include "engine_ops.cuh"

#define TILE 64
#define TKQ 8 // int32 words of k per dp4a tile step (32 k)

// Packed row length: K rounded up to 32 bytes (one mma k step; 4-byte words for dp4a).
__host__ __device__ static inline int kpadded(int K) { return (K + 31) / 32 * 32; }
__host__ __device__ static inline int kquads(int K) { return kpadded(K) / 4; }

static size_t igemm_packed_size(int K, int N) { return K < 0 || N < 0 ? 0 : (size_t)N * kpadded(K); }

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

// col_sum[n] = factor * sum_k B[k, n]: the sums (factor 1), or the epilogue's offsets for A
// stored with a zero point (factor -zero_point).
__global__ void col_sum_kernel(int32_t *col_sum, const int8_t *B, int ldb, int K, int N, int factor) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int32_t s = 0;
    for (int k = 0; k < K; k++) s += B[(size_t)k * ldb + n];
    col_sum[n] = factor * s;
}

static int pack_b(qlc_stream s, void *packed, int32_t *col_sum, const int8_t *B, int ldb, int K, int N, int factor) {
    if (K < 0 || N < 0 || ldb < (N > 1 ? N : 1)) return qlc_fail(QLC_EINVAL, "igemm_pack_b: inconsistent sizes");
    int64_t words = (int64_t)N * kquads(K);
    if (words > 0) {
        pack_b_kernel<<<blocks_for(words, 256), 256, 0, as_stream(s)>>>((int32_t *)packed, B, ldb, K, N);
        if (int st = qlc_check_launch("pack_b")) return st;
    }
    if (col_sum && N > 0) {
        col_sum_kernel<<<blocks_for(N, 256), 256, 0, as_stream(s)>>>(col_sum, B, ldb, K, N, factor);
        return qlc_check_launch("col_sum");
    }
    return QLC_OK;
}

static int igemm_pack_b(qlc_stream s, void *packed, int32_t *col_sum, const int8_t *B, int ldb, int K, int N) {
    return pack_b(s, packed, col_sum, B, ldb, K, N, 1);
}

static int igemm_pack_b_offsets(qlc_stream s, void *packed, int32_t *col_offset, const int8_t *B, int ldb, int K, int N, int zero_point) {
    return pack_b(s, packed, col_offset, B, ldb, K, N, -zero_point);
}

__device__ __forceinline__ int dp4a_us(uint32_t a, int32_t b, int32_t c) {
    int32_t d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// fmaf(acc + offset, scale, bias), then ReLU or SiLU (p.relu 1 or 2): engine_ops.cuh, the CPU's
// operations one for one
__device__ __forceinline__ float epilogue_value(int32_t acc, int n, const qlc_requant_params &p) {
    return qlc_epilogue_value(acc, p.col_offset ? p.col_offset[n] : 0, p.scale[n], p.bias ? p.bias[n] : 0.0f, p.relu);
}

__device__ __forceinline__ int8_t requant(float v) {
    int q = __float2int_rn(v); // round half to even
    return (int8_t)(q > 127 ? 127 : (q < -127 ? -127 : q));
}

// One output element through the epilogue the caller asked for.
__device__ __forceinline__ void store_out(int mode, void *out, int ldo, int i, int j, int32_t acc,
                                          const qlc_requant_params &p) {
    size_t o = (size_t)i * ldo + j;
    if (mode == QLC_OUT_S32) ((int32_t *)out)[o] = acc;
    else if (mode == QLC_OUT_S8) ((int8_t *)out)[o] = requant(epilogue_value(acc, j, p));
    else ((float *)out)[o] = epilogue_value(acc, j, p);
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
            if (i < M && j < N) store_out(mode, out, ldo, i, j, acc[r][c], p);
        }
}

// ---- tensor cores (sm_80+) ----------------------------------------------------------------
#define IM_BM 128
#define IM_BK 64
#define IM_LD 80 // bytes per shared row (64 + 16)

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
#if __CUDA_ARCH__ >= 800
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// d += a (16x32 u8, row) x b (32x8 s8, col), exact int32.
__device__ __forceinline__ void mma_u8s8(int32_t *d, const uint32_t *a, const uint32_t *b) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// BN: block tile width (128, or 256: each warp then owns 64x64 and reads half as many shared
// bytes per mma). STAGES: k tiles in flight (cp.async groups); the tile
// `STAGES - 1` ahead is being copied while this one is multiplied, with one barrier per tile.
// VEC_A: A's rows are 16-byte aligned and K % 16 == 0, so A tiles are filled by cp.async too.
// MODE (QLC_OUT_*) is a template argument: with it known, the unrolled epilogue indexes the
// accumulators with constants and they stay in registers (a run-time mode put them on the
// stack, 256 bytes of local memory per thread).
template <int BN, int STAGES, bool VEC_A, int MODE>
__global__ void __launch_bounds__(256) igemm_imma(int M, int N, int K, const uint8_t *A, int lda,
                                                   const uint8_t *Bp, void *out, int ldo,
                                                   qlc_requant_params p) {
#if __CUDA_ARCH__ >= 800
    constexpr int NT = BN / 32;                         // n8 tiles per warp (warp width BN / 4)
    constexpr int STAGE_BYTES = (IM_BM + BN) * IM_LD;   // A rows then B rows
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, each 64 rows x BN/4 columns
    const int g = lane >> 2, t = lane & 3;    // mma fragment coordinates
    // Grouped rasterization: consecutive blocks walk down a band of 8 block rows before moving
    // right, so the weight columns a band needs stay in L2 (row-major order re-read all of B,
    // 64 MB at n = 8192, once per block row).
    const int tiles_m = (M + IM_BM - 1) / IM_BM, tiles_n = (N + BN - 1) / BN, bid = blockIdx.x;
    const int band = bid / (8 * tiles_n), first = band * 8, rows = min(tiles_m - first, 8);
    const int i0 = (first + bid % rows) * IM_BM, j0 = (bid % (8 * tiles_n)) / rows * BN, Kp = kpadded(K);
    const int tiles = (Kp + IM_BK - 1) / IM_BK;

    // rows x 64 bytes = 4 chunks of 16 bytes per row; A's 128 rows, then B's BN rows.
    auto load_tile = [&](int stage, int k0) {
        uint8_t *base = smem + stage * STAGE_BYTES;
#pragma unroll
        for (int c = tid; c < (IM_BM + BN) * 4; c += 256) {
            const int r = c >> 2, kc = (c & 3) * 16, k = k0 + kc;
            uint8_t *dst = base + r * IM_LD + kc;
            if (r >= IM_BM) {
                const int j = j0 + r - IM_BM;
                const bool ok = j < N && k < Kp; // Kp % 32 == 0: a chunk is all in or all out
                cp_async16(dst, ok ? Bp + (size_t)j * Kp + k : Bp, ok ? 16 : 0);
            } else if (VEC_A) {
                const int i = i0 + r;
                const bool ok = i < M && k < K;
                cp_async16(dst, ok ? A + (size_t)i * lda + k : A, ok ? 16 : 0);
            } else {
                const int i = i0 + r;
                uint32_t w[4] = {0, 0, 0, 0};
                if (i < M)
#pragma unroll
                    for (int b = 0; b < 16; b++)
                        if (k + b < K) w[b >> 2] |= (uint32_t)A[(size_t)i * lda + k + b] << (8 * (b & 3));
                *reinterpret_cast<uint4 *>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
    };

    int32_t acc[4][NT][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < NT; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < tiles) load_tile(s, s * IM_BK);
        cp_async_commit(); // possibly empty: every iteration commits one group
    }
    for (int kt = 0; kt < tiles; kt++) {
        cp_async_wait<STAGES - 2>(); // tile kt has landed (for this thread's copies)...
        __syncthreads();             // ...and everyone's; and stage (kt - 1) is free again
        const int next = kt + STAGES - 1;
        if (next < tiles) load_tile(next % STAGES, next * IM_BK);
        cp_async_commit();
        const uint8_t *as = smem + (kt % STAGES) * STAGE_BYTES, *bs = as + IM_BM * IM_LD;
#pragma unroll
        for (int ks = 0; ks < IM_BK; ks += 32) {
            uint32_t af[4][4], bf[NT][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                const uint8_t *row = as + (wm * 64 + mi * 16 + g) * IM_LD + ks + t * 4;
                af[mi][0] = *reinterpret_cast<const uint32_t *>(row);                 // row g,   k 4t..
                af[mi][1] = *reinterpret_cast<const uint32_t *>(row + 8 * IM_LD);      // row g+8, k 4t..
                af[mi][2] = *reinterpret_cast<const uint32_t *>(row + 16);            // row g,   k 16+4t..
                af[mi][3] = *reinterpret_cast<const uint32_t *>(row + 8 * IM_LD + 16); // row g+8, k 16+4t..
            }
#pragma unroll
            for (int ni = 0; ni < NT; ni++) {
                const uint8_t *col = bs + (wn * (BN / 4) + ni * 8 + g) * IM_LD + ks + t * 4;
                bf[ni][0] = *reinterpret_cast<const uint32_t *>(col);      // column g, k 4t..
                bf[ni][1] = *reinterpret_cast<const uint32_t *>(col + 16); // column g, k 16+4t..
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < NT; ni++) mma_u8s8(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    // Accumulator fragment: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g+8.
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int ni = 0; ni < NT; ni++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = i0 + wm * 64 + mi * 16 + g + (e >> 1) * 8, j = j0 + wn * (BN / 4) + ni * 8 + 2 * t + (e & 1);
                if (i < M && j < N) store_out(MODE, out, ldo, i, j, acc[mi][ni][e], p);
            }
#endif
}

// Launches one instantiation, raising its dynamic shared-memory limit on first use.
template <int BN, int STAGES, bool VEC_A, int MODE>
static int launch_imma(cudaStream_t st, int M, int N, int K, const uint8_t *A, int lda, const uint8_t *Bp, void *out,
                       int ldo, const qlc_requant_params &p) {
    constexpr int bytes = STAGES * (IM_BM + BN) * IM_LD;
    static bool configured = false;
    if (!configured) {
        QLC_TRY(cudaFuncSetAttribute(igemm_imma<BN, STAGES, VEC_A, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        configured = true;
    }
    const unsigned blocks = (unsigned)(((N + BN - 1) / BN) * ((M + IM_BM - 1) / IM_BM));
    igemm_imma<BN, STAGES, VEC_A, MODE><<<blocks, 256, bytes, st>>>(M, N, K, A, lda, Bp, out, ldo, p);
    return qlc_check_launch("igemm_imma");
}

template <int MODE>
static int launch_imma_mode(cudaStream_t st, bool wide, bool vec, int M, int N, int K, const uint8_t *A, int lda,
                            const uint8_t *Bp, void *out, int ldo, const qlc_requant_params &p) {
    if (wide) return vec ? launch_imma<256, 3, true, MODE>(st, M, N, K, A, lda, Bp, out, ldo, p)
                         : launch_imma<256, 3, false, MODE>(st, M, N, K, A, lda, Bp, out, ldo, p);
    return vec ? launch_imma<128, 2, true, MODE>(st, M, N, K, A, lda, Bp, out, ldo, p)
               : launch_imma<128, 2, false, MODE>(st, M, N, K, A, lda, Bp, out, ldo, p);
}

static cudaDeviceProp *device_props() {
    static cudaDeviceProp prop;
    static bool done = false;
    if (!done) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) memset(&prop, 0, sizeof prop);
        done = true;
    }
    return &prop;
}
static int device_cc_major() { return device_props()->major; }

static int igemm_ex(qlc_stream s, int kernel, int mode, int M, int N, int K, const uint8_t *A, int lda,
                    const void *packed, const qlc_requant_params *hp, void *out, int ldo) {
    if (M < 0 || N < 0 || K < 0 || lda < (K > 1 ? K : 1) || ldo < (N > 1 ? N : 1))
        return qlc_fail(QLC_EINVAL, "igemm: inconsistent sizes");
    if (mode != QLC_OUT_S32 && mode != QLC_OUT_S8 && mode != QLC_OUT_F32) return qlc_fail(QLC_EINVAL, "igemm: unknown output type %d", mode);
    if (mode != QLC_OUT_S32 && (!hp || !hp->scale)) return qlc_fail(QLC_EINVAL, "igemm: epilogue needs scale");
    if (kernel != QLC_KERNEL_AUTO && kernel != QLC_IGEMM_DP4A && kernel != QLC_IGEMM_IMMA && kernel != QLC_IGEMM_IMMA_WIDE)
        return qlc_fail(QLC_EINVAL, "igemm: unknown kernel %d", kernel);
    const bool tensor_cores = device_cc_major() >= 8;
    if ((kernel == QLC_IGEMM_IMMA || kernel == QLC_IGEMM_IMMA_WIDE) && !tensor_cores)
        return qlc_fail(QLC_EUNAVAILABLE, "igemm: the tensor-core kernel needs sm_80 or newer");
    if (((uintptr_t)packed & 15) != 0) return qlc_fail(QLC_EINVAL, "igemm: packed weights must be 16-byte aligned");
    if (M == 0 || N == 0) return QLC_OK;
    qlc_requant_params p = hp ? *hp : qlc_requant_params{};
    if (kernel == QLC_IGEMM_DP4A || !tensor_cores) {
        igemm_dp4a<<<dim3((N + TILE - 1) / TILE, (M + TILE - 1) / TILE), dim3(16, 16), 0, as_stream(s)>>>(
            M, N, K, A, lda, (const int32_t *)packed, mode, out, ldo, p);
        return qlc_check_launch("igemm_dp4a");
    }
    const uint8_t *Bp = (const uint8_t *)packed;
    const bool vec = ((uintptr_t)A & 15) == 0 && lda % 16 == 0 && K % 16 == 0;
    // AUTO: 128x128 tiles, 2 stages (128x256 with 3 stages measured no faster on an H100)
    const bool wide = kernel == QLC_IGEMM_IMMA_WIDE;
    cudaStream_t st = as_stream(s);
    if (mode == QLC_OUT_S32) return launch_imma_mode<QLC_OUT_S32>(st, wide, vec, M, N, K, A, lda, Bp, out, ldo, p);
    if (mode == QLC_OUT_S8) return launch_imma_mode<QLC_OUT_S8>(st, wide, vec, M, N, K, A, lda, Bp, out, ldo, p);
    return launch_imma_mode<QLC_OUT_F32>(st, wide, vec, M, N, K, A, lda, Bp, out, ldo, p);
}

static int igemm_s32(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed, int32_t *C, int ldc) {
    return igemm_ex(s, QLC_KERNEL_AUTO, QLC_OUT_S32, M, N, K, A, lda, packed, NULL, C, ldc);
}
static int igemm_s8(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                    const qlc_requant_params *hp, int8_t *out, int ldo) {
    return igemm_ex(s, QLC_KERNEL_AUTO, QLC_OUT_S8, M, N, K, A, lda, packed, hp, out, ldo);
}
static int igemm_f32(qlc_stream s, int M, int N, int K, const uint8_t *A, int lda, const void *packed,
                     const qlc_requant_params *hp, float *out, int ldo) {
    return igemm_ex(s, QLC_KERNEL_AUTO, QLC_OUT_F32, M, N, K, A, lda, packed, hp, out, ldo);
}

__global__ void epilogue_kernel(int M, int N, int mode, void *out, int ldo, const int32_t *acc, int ldacc, qlc_requant_params p) {
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (int64_t)M * N) return;
    int i = (int)(t / N), j = (int)(t % N);
    float v = epilogue_value(acc[(size_t)i * ldacc + j], j, p);
    if (mode == QLC_OUT_S8) ((int8_t *)out)[(size_t)i * ldo + j] = requant(v);
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
    return epilogue(s, M, N, QLC_OUT_S8, out, ldo, acc, ldacc, hp);
}
static int dequantize_f32(qlc_stream s, int M, int N, float *out, int ldo, const int32_t *acc, int ldacc, const qlc_requant_params *hp) {
    return epilogue(s, M, N, QLC_OUT_F32, out, ldo, acc, ldacc, hp);
}

void qlc_fill_igemm(qlc_api *api) {
    api->igemm_ex = igemm_ex;
    api->igemm_packed_size = igemm_packed_size;
    api->igemm_pack_b = igemm_pack_b;
    api->igemm_pack_b_offsets = igemm_pack_b_offsets;
    api->igemm_u8s8s32 = igemm_s32;
    api->igemm_u8s8_s8 = igemm_s8;
    api->igemm_u8s8_f32 = igemm_f32;
    api->requantize_s8 = requantize_s8;
    api->dequantize_f32 = dequantize_f32;
}
