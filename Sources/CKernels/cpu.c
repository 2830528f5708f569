/* CPU feature detection and ISA selection. */
#define _POSIX_C_SOURCE 200809L
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"

static unsigned long long xgetbv0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

static int detect(ql_isa isa) {
    unsigned int a, b, c, d;
    if (isa == QL_ISA_REF) return 1;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int avx2 = (b >> 5) & 1;
    if (isa == QL_ISA_AVX2) return avx2 && fma;
    if (isa == QL_ISA_AVX512) {
        int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
        int zmm_os = (xcr0 & 0xe0) == 0xe0; /* opmask + ZMM state */
        return avx2 && fma && f && bw && vl && vnni && zmm_os;
    }
    return 0;
}

int ql_isa_supported(ql_isa isa) {
    static int cache[3] = {-1, -1, -1};
    if (isa < QL_ISA_REF || isa > QL_ISA_AVX512) return 0;
    if (cache[isa] < 0) cache[isa] = detect(isa);
    return cache[isa];
}

ql_isa ql_isa_best(void) {
    ql_isa cap = QL_ISA_AVX512;
    const char *env = getenv("QL_ISA");
    if (env) {
        if (strcmp(env, "ref") == 0) cap = QL_ISA_REF;
        else if (strcmp(env, "avx2") == 0) cap = QL_ISA_AVX2;
    }
    for (int i = cap; i > QL_ISA_REF; i--)
        if (ql_isa_supported((ql_isa)i)) return (ql_isa)i;
    return QL_ISA_REF;
}

const char *ql_isa_name(ql_isa isa) {
    switch (isa) {
    case QL_ISA_REF: return "ref";
    case QL_ISA_AVX2: return "avx2";
    case QL_ISA_AVX512: return "avx512";
    case QL_ISA_BEST: return ql_isa_name(ql_isa_best());
    }
    return "unknown";
}

int ql_resolve_isa(ql_isa isa) {
    if (isa == QL_ISA_BEST) return (int)ql_isa_best();
    return ql_isa_supported(isa) ? (int)isa : -1;
}

void *ql_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, (bytes + 63) & ~(size_t)63) != 0) return NULL;
    return p;
}

void ql_aligned_free(void *p) { free(p); }

void *ql_scratch_reserve(ql_scratch *s, size_t bytes) {
    if (s->bytes < bytes) {
        ql_aligned_free(s->ptr);
        s->ptr = ql_aligned_alloc(bytes);
        s->bytes = s->ptr ? bytes : 0;
    }
    return s->ptr;
}

void ql_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

/* ---------------------------------------------------------------------------------------- */
/* Memory policy                                                                             */
/* ---------------------------------------------------------------------------------------- */
#include <malloc.h>

/* A training step allocates and frees the same tensors (activations, gradients: up to ~15 MB
 * each for the detector at batch 32) every step. With glibc's defaults, blocks above the
 * dynamic mmap threshold are mmap'd and unmapped, and the heap top is trimmed back to the
 * kernel, so every step faults fresh zeroed pages in again (~7% of a step in the kernel on
 * the 2-core VM, issue #18). Keep freed memory in the process instead: blocks up to 32 MiB
 * (glibc's maximum threshold) from the heap, no trimming below 1 GiB, 64 MiB of padding per
 * heap growth. Peak memory is unchanged; the process just does not give it back while it
 * runs. QL_MALLOC_KEEP=0, or glibc's own MALLOC_*_ environment settings, leave glibc's
 * defaults alone. */
__attribute__((constructor)) static void ql_malloc_policy(void) {
    const char *keep = getenv("QL_MALLOC_KEEP");
    if (keep && keep[0] == '0') return;
    if (getenv("MALLOC_MMAP_THRESHOLD_") || getenv("MALLOC_TRIM_THRESHOLD_") || getenv("MALLOC_TOP_PAD_")) return;
    mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
    mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024);
    mallopt(M_TOP_PAD, 64 * 1024 * 1024);
}
