/* Peak-rate probes (contract in ckernels.h, ql_peak_probe): how many FP32 multiply-adds and
 * how many INT8 multiply-adds one core can issue per second with the instructions our kernels
 * use, measured, not looked up. Their ratio is the most INT8 can gain over FP32 on this CPU
 * before any algorithm (Winograd) or memory effect: the ceiling the engine's INT8 / FP32 ratio
 * is read against.
 *
 *   FP32, AVX2:   vfmadd231ps ymm             8 multiply-adds per instruction
 *   INT8, AVX2:   vpmaddubsw + vpmaddwd + vpaddd (the exact u8 x s8 dot of igemm.c and
 *                 iconv.c)                    32 multiply-adds per three instructions
 *   FP32, AVX512: vfmadd231ps zmm             16
 *   INT8, AVX512: vpdpbusd zmm (VNNI)         64
 *
 * Each probe runs independent accumulator chains (enough to cover the instructions' latency
 * on current x86 cores) in a loop the compiler cannot shorten: every instruction is
 * one inline-asm statement on a register. The operands are chosen so that the result is known
 * in closed form, and the probe returns it: a test checks it against that formula (the
 * reference), which shows the instructions ran, each iteration, and computed what they claim.
 *   FP32: each chain does a = a * 1 + 1, then a = a * 1 - 1 (exact), so it ends where it began.
 *   INT8: chain i adds, per iteration and per int32 lane, 4 * 3 * (i - 3) (u8 codes 3, s8
 *   weights i - 3), modulo 2^32. */
#include <immintrin.h>
#include <stdint.h>
#include "internal.h"

/* Independent chains: 10 covers an FMA's or vpdpbusd's latency (4-5 cycles) times two pipes;
 * the AVX2 INT8 chain's only dependency is vpaddd (1 cycle), and 6 chains keep its 6 weight
 * registers and 6 accumulators within the 16 ymm registers. */
#define PF 10
#define PI2 6
#define PI5 10

static int chains(int level, int kind) { return kind == QL_PEAK_INT8 && level != QL_ISA_AVX512 ? PI2 : kind == QL_PEAK_INT8 ? PI5 : PF; }

__attribute__((target("avx2,fma"))) static uint32_t fp32_avx2(long iters) {
    __m256 a[PF], one = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
    for (int i = 0; i < PF; i++) a[i] = _mm256_set1_ps((float)i);
    for (long n = 0; n < iters; n++) {
        for (int i = 0; i < PF; i++) __asm__ volatile("vfmadd231ps %1, %1, %0" : "+x"(a[i]) : "x"(one));
        for (int i = 0; i < PF; i++) __asm__ volatile("vfmadd213ps %2, %1, %0" : "+x"(a[i]) : "x"(one), "x"(minus));
    }
    float sum = 0;
    for (int i = 0; i < PF; i++) sum += _mm256_cvtss_f32(a[i]);
    return (uint32_t)sum;
}

__attribute__((target("avx2"))) static uint32_t int8_avx2(long iters) {
    __m256i a[PI2], w[PI2], x = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    for (int i = 0; i < PI2; i++) {
        a[i] = _mm256_set1_epi32(i);
        w[i] = _mm256_set1_epi8((char)(i - 3));
    }
    for (long n = 0; n < iters; n++)
        for (int i = 0; i < PI2; i++) {
            __m256i p;
            __asm__ volatile("vpmaddubsw %2, %1, %0" : "=x"(p) : "x"(x), "x"(w[i]));
            __asm__ volatile("vpmaddwd %1, %0, %0" : "+x"(p) : "x"(ones));
            __asm__ volatile("vpaddd %1, %0, %0" : "+x"(a[i]) : "x"(p));
        }
    uint32_t sum = 0;
    for (int i = 0; i < PI2; i++) sum += (uint32_t)_mm256_cvtsi256_si32(a[i]);
    return sum;
}

__attribute__((target("avx512f"))) static uint32_t fp32_avx512(long iters) {
    __m512 a[PF], one = _mm512_set1_ps(1.0f), minus = _mm512_set1_ps(-1.0f);
    for (int i = 0; i < PF; i++) a[i] = _mm512_set1_ps((float)i);
    for (long n = 0; n < iters; n++) {
        for (int i = 0; i < PF; i++) __asm__ volatile("vfmadd231ps %1, %1, %0" : "+v"(a[i]) : "v"(one));
        for (int i = 0; i < PF; i++) __asm__ volatile("vfmadd213ps %2, %1, %0" : "+v"(a[i]) : "v"(one), "v"(minus));
    }
    float sum = 0;
    for (int i = 0; i < PF; i++) sum += _mm512_cvtss_f32(a[i]);
    return (uint32_t)sum;
}

__attribute__((target("avx512f,avx512vnni"))) static uint32_t int8_avx512(long iters) {
    __m512i a[PI5], w[PI5], x = _mm512_set1_epi8(3);
    for (int i = 0; i < PI5; i++) {
        a[i] = _mm512_set1_epi32(i);
        w[i] = _mm512_set1_epi8((char)(i - 3));
    }
    for (long n = 0; n < iters; n++)
        for (int i = 0; i < PI5; i++) __asm__ volatile("vpdpbusd %2, %1, %0" : "+v"(a[i]) : "v"(x), "v"(w[i]));
    uint32_t sum = 0;
    for (int i = 0; i < PI5; i++) sum += (uint32_t)_mm512_cvtsi512_si32(a[i]);
    return sum;
}

uint32_t ql_peak_expected(ql_isa isa, int kind, long iters) {
    int level = ql_resolve_isa(isa), p = chains(level, kind);
    uint32_t sum = 0;
    for (int i = 0; i < p; i++) /* FP32: chain i ends at i; INT8: i + iters * 4 * 3 * (i - 3), modulo 2^32 */
        sum += (uint32_t)i + (kind == QL_PEAK_INT8 ? (uint32_t)iters * (uint32_t)(12 * (i - 3)) : 0u);
    return sum;
}

int ql_peak_probe(ql_isa isa, int kind, long iters, double *macs, uint32_t *check) {
    int level = ql_resolve_isa(isa);
    if (level < 0) return QL_EUNSUPPORTED;
    if ((kind != QL_PEAK_FP32 && kind != QL_PEAK_INT8) || iters < 0 || !macs || !check) return QL_EINVAL;
    if (level == QL_ISA_REF) return QL_EUNSUPPORTED; /* a peak of vector units: no scalar probe */
    double lanes = level == QL_ISA_AVX512 ? 16 : 8, p = chains(level, kind); /* 32-bit lanes per register */
    if (kind == QL_PEAK_FP32) {
        *check = level == QL_ISA_AVX512 ? fp32_avx512(iters) : fp32_avx2(iters);
        *macs = 2.0 * p * lanes * (double)iters; /* two FMAs per chain per iteration */
    } else {
        *check = level == QL_ISA_AVX512 ? int8_avx512(iters) : int8_avx2(iters);
        *macs = 4.0 * p * lanes * (double)iters; /* four u8 x s8 products per 32-bit lane */
    }
    return QL_OK;
}
