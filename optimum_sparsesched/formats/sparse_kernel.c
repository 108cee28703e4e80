/* run_compressed="sparse": y = x · Wᵀ computed straight from one Linear's compact tensors, for a few input rows.
 *
 * Compiled at load time by optimum_sparsesched/formats/sparse_kernel.py with the system's C compiler
 * (-O3 -march=native, OpenMP when the compiler has it); no Python or torch headers are needed.
 *
 * The weight W [rows, cols] is the compact format of formats/compact.py:
 *   mask   uint8 [rows, nb], nb = ceil(cols / 8): bit c % 8 of byte c / 8 is set where W[r, c] is kept
 *          (bits past the last column are 0: checked at load);
 *   starts int64 [rows]: the kept weights before row r (their index in the row-major order of the stored ones);
 *   either values [nnz] in the model dtype (float32, bfloat16 or float16),
 *   or codes: bits = 4 (two per byte, low nibble first) or 8 (one per byte), on the grid (s, z) of their
 *          (row, group) of gs columns: scale bfloat16 [rows, groups] and zero (packed like the codes, or NULL for
 *          the symmetric zero point 2^(bits - 1)). A kept weight is W = cast(s · (q − z)) with s · (q − z) computed in
 *          float32 and cast to the model dtype (wdtype) exactly as the decoding load does: the kernel uses the same
 *          weights as the decoded model, bit for bit; only the order of the float32 summation differs.
 *   x float32 [T, cols], y float32 [T, rows]; the rows of x are taken MAX_T at a time, each block in one pass
 *   over the row of W.
 *
 * Work: one pass over the row's mask and its kept weights per call (no dense weight is ever formed); every kept
 * weight is multiplied into the T rows of x. With AVX-512 (F, BW, VL), 16 columns at a time: the kept weights of a
 * 16-column piece are loaded contiguously (4-bit codes through a 16-entry table of the group's dequantized values,
 * one vpermps) and moved to their columns with vexpandps under the piece's 16 mask bits. Without, a scalar loop
 * over the set bits. Rows are split between OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(SPARSE_KERNEL_SCALAR)
#include <immintrin.h>
#define SPARSE_KERNEL_AVX512 1
#endif

#define MAX_T 8
enum { F32 = 0, BF16 = 1, F16 = 2 };

typedef struct {
    int64_t rows, cols, nb, T, gs, groups; /* T: the rows of x in this block, at most MAX_T */
    const uint8_t *mask;
    const int64_t *starts;
    const void *values;  /* without bits; NULL when nothing is kept */
    int vdtype;          /* dtype of values */
    const uint8_t *codes; /* with bits (4 or 8; 0: values); NULL when nothing is kept */
    int bits;
    const uint16_t *scale;
    const uint8_t *zero; /* or NULL: symmetric */
    int wdtype;          /* the model dtype the dequantized weights are cast to */
    const float *x;
    float *y;
} Args;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    float f;
    if (exp == 0) { /* zero or subnormal: man · 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    u = exp == 0x1F ? sign | 0x7F800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &u, 4);
    return f;
}

/* round-to-nearest-even of a finite float32 to bfloat16, back in float32 (torch's conversion) */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* round-to-nearest-even of a finite float32 to float16, back in float32 (torch's conversion) */
static inline float round_f16(float f) {
#if defined(__FLT16_MAX__) && !defined(SPARSE_KERNEL_NO_FLOAT16)
    return (float)(_Float16)f;
#else
    float size = fabsf(f), step;
    int e;
    if (size >= 65520.0f) return copysignf(INFINITY, f); /* what the cast gives */
    if (size < 6.103515625e-05f) {
        step = 5.9604644775390625e-08f; /* below 2^-14: float16 subnormals, steps of 2^-24 */
    } else {
        frexpf(size, &e); /* size = m · 2^e, m in [0.5, 1): 10 fraction bits below the leading 2^(e-1) */
        step = ldexpf(1.0f, e - 11);
    }
    return nearbyintf(f / step) * step; /* exact division by a power of two; the default mode rounds to even */
#endif
}

static inline float round_to(float f, int dtype) {
    return dtype == BF16 ? round_bf16(f) : dtype == F16 ? round_f16(f) : f;
}

static inline float stored_value(const Args *a, int64_t k) {
    if (a->vdtype == F32) return ((const float *)a->values)[k];
    uint16_t h = ((const uint16_t *)a->values)[k];
    return a->vdtype == BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline unsigned code_at(const uint8_t *packed, int bits, int64_t i) {
    return bits == 8 ? packed[i] : (packed[i >> 1] >> ((i & 1) << 2)) & 15u;
}

/* the grid (s, z) of (row r, group g) */
static inline void grid_of(const Args *a, int64_t r, int64_t g, float *s, float *z) {
    int64_t i = r * a->groups + g;
    *s = bf16_to_f32(a->scale[i]);
    *z = a->zero ? (float)code_at(a->zero, a->bits, i) : (float)(1 << (a->bits - 1));
}

#ifndef SPARSE_KERNEL_AVX512
static void row_scalar(const Args *a, int64_t r) {
    float acc[MAX_T] = {0}, lut[16], s = 0.f, z = 0.f;
    int64_t k = a->starts[r], group_end = 0;
    const uint8_t *m = a->mask + r * a->nb;
    for (int64_t j = 0; j < a->nb; j++) {
        unsigned b = m[j];
        while (b) {
            int64_t c = j * 8 + __builtin_ctz(b);
            float w;
            b &= b - 1;
            if (a->bits) {
                if (c >= group_end) {
                    int64_t g = c / a->gs;
                    group_end = (g + 1) * a->gs;
                    grid_of(a, r, g, &s, &z);
                    if (a->bits == 4)
                        for (int l = 0; l < 16; l++) lut[l] = round_to(s * ((float)l - z), a->wdtype);
                }
                unsigned q = code_at(a->codes, a->bits, k);
                w = a->bits == 4 ? lut[q] : round_to(s * ((float)q - z), a->wdtype);
            } else {
                w = stored_value(a, k);
            }
            k++;
            for (int64_t t = 0; t < a->T; t++) acc[t] += w * a->x[t * a->cols + c];
        }
    }
    for (int64_t t = 0; t < a->T; t++) a->y[t * a->rows + r] = acc[t];
}
#endif

#ifdef SPARSE_KERNEL_AVX512
static inline __m512 round_vec(__m512 v, int dtype) {
    if (dtype == BF16) {
        __m512i u = _mm512_castps_si512(v);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
        return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    if (dtype == F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}

/* bits [c, c + width) of a mask row of nb bytes, width <= 16, read without passing the row's end */
static inline unsigned mask_bits(const uint8_t *m, int64_t nb, int64_t c, int width) {
    int64_t j = c >> 3;
    uint32_t v = 0;
    if (j + 4 <= nb) memcpy(&v, m + j, 4);
    else memcpy(&v, m + j, (size_t)(nb - j));
    return (v >> (c & 7)) & ((1u << width) - 1u);
}

/* the count kept weights from index k on, in lanes 0 .. count-1 (float32, cast to the model dtype) */
static inline __m512 kept_vec(const Args *a, int64_t k, int count, __m512 lut, __m512 s, __m512 z) {
    __mmask16 lanes = (__mmask16)((1u << count) - 1u);
    if (!a->bits) {
        if (a->vdtype == F32) return _mm512_maskz_loadu_ps(lanes, (const float *)a->values + k);
        __m256i h = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)a->values + k);
        if (a->vdtype == F16) return _mm512_cvtph_ps(h);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (a->bits == 8) {
        __m128i q = _mm_maskz_loadu_epi8(lanes, a->codes + k);
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
        return round_vec(_mm512_mul_ps(s, _mm512_sub_ps(f, z)), a->wdtype);
    }
    int odd = (int)(k & 1);
    int bytes = (odd + count + 1) >> 1;
    __m128i v = _mm_maskz_loadu_epi8((__mmask16)((1u << bytes) - 1u), a->codes + (k >> 1));
    __m128i low = _mm_and_si128(v, _mm_set1_epi8(15));
    __m128i high = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
    __m128i n0 = _mm_unpacklo_epi8(low, high), n1 = _mm_unpackhi_epi8(low, high); /* nibbles 0-15, 16-31 */
    /* from nibble 1 on when k is odd: a blend, not a branch (k's parity is a coin toss per step) */
    __m128i n = _mm_mask_blend_epi8((__mmask16)(0u - (unsigned)odd), n0, _mm_alignr_epi8(n1, n0, 1));
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(n), lut);
}

/* one row for T input rows; inlined per constant T so that the accumulators stay in registers */
static inline __attribute__((always_inline)) void row_avx512_t(const Args *a, int64_t r, const int T) {
    __m512 acc[MAX_T];
    int64_t k = a->starts[r];
    const uint8_t *m = a->mask + r * a->nb;
    const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a->groups; g++) {
        int64_t c0 = g * a->gs, c1 = c0 + a->gs < a->cols ? c0 + a->gs : a->cols;
        __m512 lut = _mm512_setzero_ps(), sv = lut, zv = lut;
        if (a->bits) {
            float s, z;
            grid_of(a, r, g, &s, &z);
            sv = _mm512_set1_ps(s);
            zv = _mm512_set1_ps(z);
            if (a->bits == 4) /* the group's 16 dequantized values, cast as the decoding casts them */
                lut = round_vec(_mm512_mul_ps(sv, _mm512_sub_ps(levels, zv)), a->wdtype);
        }
        for (int64_t c = c0; c < c1; c += 16) {
            int width = c1 - c < 16 ? (int)(c1 - c) : 16;
            unsigned bits = mask_bits(m, a->nb, c, width);
            if (!bits) continue;
            int count = __builtin_popcount(bits);
            __m512 w = _mm512_maskz_expand_ps((__mmask16)bits, kept_vec(a, k, count, lut, sv, zv));
            __mmask16 cols = (__mmask16)((1u << width) - 1u);
            k += count;
            for (int t = 0; t < T; t++)
                acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(cols, a->x + t * a->cols + c), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) a->y[t * a->rows + r] = _mm512_reduce_add_ps(acc[t]);
}

static void row_avx512(const Args *a, int64_t r) {
    switch (a->T) {
    case 1: row_avx512_t(a, r, 1); break;
    case 2: row_avx512_t(a, r, 2); break;
    case 3: row_avx512_t(a, r, 3); break;
    case 4: row_avx512_t(a, r, 4); break;
    case 5: row_avx512_t(a, r, 5); break;
    case 6: row_avx512_t(a, r, 6); break;
    case 7: row_avx512_t(a, r, 7); break;
    default: row_avx512_t(a, r, MAX_T); break;
    }
}
#endif

/* 1 when the AVX-512 path was compiled in, else 0 (the scalar loop) */
int sparse_kernel_vectorized(void) {
#ifdef SPARSE_KERNEL_AVX512
    return 1;
#else
    return 0;
#endif
}

/* y = x · Wᵀ (see the top of the file). Returns 0, or -1 for arguments out of range (nothing written). */
int sparse_linear(int64_t rows, int64_t cols, int64_t T, const uint8_t *mask, const int64_t *starts,
                  const void *values, int vdtype, const uint8_t *codes, int bits, const uint16_t *scale,
                  const uint8_t *zero, int64_t group_size, int wdtype, const float *x, float *y, int threads) {
    if (rows < 0 || cols < 1 || T < 1 || threads < 1) return -1;
    if (bits && ((bits != 4 && bits != 8) || group_size < 1)) return -1;
    if (rows == 0) return 0;
    if (bits && !scale) return -1; /* codes may be NULL: a weight with no kept entry reads none */
    Args a = {rows, cols, (cols + 7) / 8, T, bits ? group_size : cols, 0, mask, starts, bits ? NULL : values, vdtype,
              bits ? codes : NULL, bits, scale, zero, wdtype, x, y};
    a.groups = (cols + a.gs - 1) / a.gs;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 65536 && threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        Args block = a;
        for (int64_t t0 = 0; t0 < T; t0 += MAX_T) {
            block.T = T - t0 < MAX_T ? T - t0 : MAX_T;
            block.x = x + t0 * cols;
            block.y = y + t0 * rows;
#ifdef SPARSE_KERNEL_AVX512
            row_avx512(&block, r);
#else
            row_scalar(&block, r);
#endif
        }
    }
    return 0;
}
