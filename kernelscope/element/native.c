/*
 * The per-element work of kernelscope, for CPU (see reference.py, the torch code that defines what
 * it computes and runs everywhere else): the two passes of a profile and fake quantization.
 *
 *   ks_ranges: t_i = max_j |x_ij| and c_j = max_i |x_ij| per sequence, NaN and ±Inf measured as 0,
 *              in one reading of x.
 *   ks_count:  for several quantizers at once, each described by a ks_term (its scale layout, the
 *              form of its scale, its zero threshold tau, ...): the elements with |x / s| <= tau (the
 *              kernel), those on a subnormal code, the positions whose step is below the per-token
 *              step, the blocks that are kernel through and through, the non-finite elements, and
 *              for block scales the zero bound's extremes, sums and histogram, in one more reading.
 *   ks_quantize: one quantizer's fake quantization of x, or x with only its kernel |x / s| <= limit
 *              set to zero, with how many elements went to zero.
 *
 * Built with -ffp-contract=off and without -ffast-math: every float operation here is one IEEE
 * operation in the same order as the torch code (a divide, a multiply, a comparison), so the counts
 * equal torch's to the last element. Maxima are taken on the bit patterns of |x|: a non-negative
 * float's bits order like the float, and integer maxima vectorise where float ones may not.
 * Rows are shared among OpenMP threads; each thread keeps its own counts, merged at the end in an
 * order that cannot change a result.
 *
 * The layout of ks_term and every enum below are checked against their Python mirror when the
 * library is loaded (ks_abi): a mismatch is refused there, never read here.
 */
#include <float.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define KS_ABI_VERSION 3
/* Row helpers are compiled on their own, where their restrict arguments let their loops vectorise. */
#define KS_ROW __attribute__((noinline))
#define KS_MAX_TERMS 64
#define ABS_MASK 0x7fffffffu
#define INF_BITS 0x7f800000u

enum { KS_F32 = 0, KS_BF16 = 1 };                                              /* element type of x */
enum { KS_TOKEN = 0, KS_TENSOR = 1, KS_CHANNEL = 2, KS_SEP = 3, KS_BLOCK = 4 }; /* scale layouts */
enum { KS_ABSMAX = 0, KS_E8M0_FLOOR = 1, KS_E8M0_RCEIL = 2, KS_NVFP4 = 3 };    /* scale forms */
enum { KS_KERNEL = 0, KS_SUBNORMAL = 1, KS_BELOW = 2, KS_KERNEL_BLOCKS = 3, KS_NCOUNTS = 4 };

/* One quantizer as the count takes it (kernelscope.element.native.Term mirrors it field by field). */
typedef struct {
    int32_t layout;      /* KS_TOKEN (one scale per row, from t), KS_TENSOR (per sequence, from max t),
                            KS_CHANNEL (per column, from c), KS_SEP (max(row·col / divisor, floor)),
                            KS_BLOCK (per `block` consecutive channels of a row, from their abs-max) */
    int32_t form;        /* how a unit's abs-max becomes its scale: KS_ABSMAX max(amax / divisor, floor),
                            KS_E8M0_FLOOR 2^clamp(floor(log2 amax) - emax), KS_E8M0_RCEIL
                            2^clamp(ceil(log2(amax / divisor))), KS_NVFP4 g·e4m3(clamp(amax / divisor / g)) */
    int32_t block;       /* KS_BLOCK: channels a block */
    int32_t emax;        /* KS_E8M0_FLOOR: exponent of the grid's largest power of two */
    int32_t slot;        /* KS_BLOCK: row of the bound outputs; -1 otherwise */
    int32_t inner_emin;  /* KS_NVFP4: the block scale's E4M3 grid: smallest normal exponent, */
    int32_t inner_mbits; /* and mantissa bits */
    int32_t reserved;
    float divisor;       /* the grid's largest value (qmax for INT) */
    float floor_;        /* KS_ABSMAX and KS_SEP: the scale's floor */
    float tau;           /* zero threshold: a power of two */
    float sub_hi;        /* > 0: count quotients in (tau, sub_hi), the subnormal codes */
    float below_qmax;    /* > 0: count positions whose scale is below max(t / below_qmax, step floor) */
    float tensor_divisor;/* KS_NVFP4: the tensor scale is max|X| / tensor_divisor */
    float inner_min;     /* KS_NVFP4: the block scale's clamp, and its E4M3 grid's largest value */
    float inner_max;
} ks_term;

/* Whether a scale form gives only powers of two (E8M0). */
static inline int power_of_two_scales(int form) { return form == KS_E8M0_FLOOR || form == KS_E8M0_RCEIL; }

static inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

/* Eight lanes of float32 and of int32 (GCC's and clang's vector extensions: SIMD registers where the
 * machine has them, plain code where it does not). */
typedef float ks_v8f __attribute__((vector_size(32)));
typedef int32_t ks_v8i __attribute__((vector_size(32)));
#define KS_SPLAT(v) {(v), (v), (v), (v), (v), (v), (v), (v)}

static inline ks_v8i vmax(ks_v8i a, ks_v8i b) {
#ifdef __AVX2__
    return (ks_v8i)_mm256_max_epi32((__m256i)a, (__m256i)b); /* one instruction, not a compare and a blend */
#else
    const ks_v8i gt = a > b; /* -1 where a > b */
    return (a & gt) | (b & ~gt);
#endif
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define KS_SHUFFLES 1
#define KS_PICK(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

/* Lane b of the result: the largest lane of v[b], for eight vectors at once (three rounds that each
 * halve the lanes per vector, 2.6 operations a vector instead of lane_max's six). */
static inline ks_v8i lane_max8(const ks_v8i* v) {
    ks_v8i r[4], s[2];
    for (int p = 0; p < 4; p++) /* lanes 0-3: v[2p]'s four pairs, 4-7: v[2p+1]'s */
        r[p] = vmax(KS_PICK(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11),
                    KS_PICK(v[2 * p], v[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15));
    for (int p = 0; p < 2; p++) /* lanes: v[4p] twice, v[4p+2] twice, v[4p+1] twice, v[4p+3] twice */
        s[p] = vmax(KS_PICK(r[2 * p], r[2 * p + 1], 0, 1, 8, 9, 4, 5, 12, 13),
                    KS_PICK(r[2 * p], r[2 * p + 1], 2, 3, 10, 11, 6, 7, 14, 15));
    return vmax(KS_PICK(s[0], s[1], 0, 4, 2, 6, 8, 12, 10, 14), KS_PICK(s[0], s[1], 1, 5, 3, 7, 9, 13, 11, 15));
}
#endif

/* The largest of eight lanes. */
static inline int32_t lane_max(ks_v8i m) {
#ifdef KS_SHUFFLES
    ks_v8i h = __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
    m = vmax(m, h);
    h = __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
    m = vmax(m, h);
    h = __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
    m = vmax(m, h);
    return m[0];
#else
    int32_t top = m[0];
    for (int j = 1; j < 8; j++) top = m[j] > top ? m[j] : top;
    return top;
#endif
}

/* ABI check: what Python compares with its mirror before the first call. */
int ks_abi(int64_t* out, int n) {
    const int64_t v[] = {
        KS_ABI_VERSION, (int64_t)sizeof(ks_term), KS_MAX_TERMS,
        (int64_t)offsetof(ks_term, layout), (int64_t)offsetof(ks_term, form),
        (int64_t)offsetof(ks_term, block), (int64_t)offsetof(ks_term, emax),
        (int64_t)offsetof(ks_term, slot), (int64_t)offsetof(ks_term, inner_emin),
        (int64_t)offsetof(ks_term, inner_mbits), (int64_t)offsetof(ks_term, divisor),
        (int64_t)offsetof(ks_term, floor_), (int64_t)offsetof(ks_term, tau),
        (int64_t)offsetof(ks_term, sub_hi), (int64_t)offsetof(ks_term, below_qmax),
        (int64_t)offsetof(ks_term, tensor_divisor), (int64_t)offsetof(ks_term, inner_min),
        (int64_t)offsetof(ks_term, inner_max),
        KS_F32, KS_BF16, KS_TOKEN, KS_TENSOR, KS_CHANNEL, KS_SEP, KS_BLOCK,
        KS_ABSMAX, KS_E8M0_FLOOR, KS_E8M0_RCEIL, KS_NVFP4,
        KS_KERNEL, KS_SUBNORMAL, KS_BELOW, KS_KERNEL_BLOCKS, KS_NCOUNTS,
    };
    const int count = (int)(sizeof v / sizeof v[0]);
    for (int i = 0; i < n && i < count; i++) out[i] = v[i];
    return count;
}

/* |x| of one bfloat16 row as float32 bit patterns (sign cleared; NaN and Inf keep their exponent). */
static void bf16_abs_bits(const uint16_t* restrict in, uint32_t* restrict out, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] = ((uint32_t)in[j] << 16) & ABS_MASK;
}

/* Row maximum of the finite |x| (non-finite as 0) of float32 bit patterns, folding the row into
 * the channel maxima. */
static uint32_t fold_row(const uint32_t* restrict x, uint32_t* restrict colmax, int64_t n) {
    uint32_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t v = x[j] & ABS_MASK;
        v &= -(uint32_t)(v < INF_BITS); /* a mask, not a branch: it vectorises */
        m = m < v ? v : m;
        uint32_t c = colmax[j];
        colmax[j] = c < v ? v : c;
    }
    return m;
}

int64_t ks_ranges_scratch(int64_t I, int threads) { return (int64_t)(threads < 1 ? 1 : threads) * I * 2 * 4; }

/* x (S, T, I) row-major -> t (S, T) and c (S, I) float32, with ks_ranges_scratch bytes of scratch. */
void ks_ranges(const void* x, int dtype, int64_t S, int64_t T, int64_t I, float* t, float* c, int threads,
              void* scratch_) {
    if (threads < 1) threads = 1;
    uint32_t* scratch = scratch_;
    for (int64_t s = 0; s < S; s++) {
        uint32_t* cs = (uint32_t*)(c + s * I);
        memset(cs, 0, (size_t)I * sizeof(uint32_t));
        #pragma omp parallel num_threads(threads)
        {
            uint32_t* colmax = scratch + (size_t)omp_get_thread_num() * (size_t)I * 2;
            uint32_t* row = colmax + I;
            memset(colmax, 0, (size_t)I * sizeof(uint32_t));
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < T; i++) {
                const uint32_t* in = (const uint32_t*)x + (s * T + i) * I;
                if (dtype != KS_F32) {
                    bf16_abs_bits((const uint16_t*)x + (s * T + i) * I, row, I);
                    in = row;
                }
                uint32_t m = fold_row(in, colmax, I);
                memcpy(t + s * T + i, &m, sizeof m);
            }
            #pragma omp critical
            for (int64_t j = 0; j < I; j++) cs[j] = cs[j] < colmax[j] ? colmax[j] : cs[j];
        }
    }
}

/* ---- scales: the operations of kernelscope.quant.formats.scale_of, in the same order ---------- */

/* 2^e as float32 for integer e in [-149, 127], subnormals too. */
static inline float pow2i(int e) {
    return e >= -126 ? bitsf((uint32_t)(e + 127) << 23) : bitsf(1u << (e + 149));
}

/* floor(log2 a) read from the float32 exponent field (-127 for zero and subnormals). */
static inline int exponent_field(float a) { return (int)((fbits(a) >> 23) & 0xFFu) - 127; }

static inline int clamp_e8m0(int e) { return e < -127 ? -127 : (e > 127 ? 127 : e); }

/* A positive float32 in [2^emin, max] rounded to a float grid of `mbits` mantissa bits (nearest,
 * ties to even), as kernelscope.quant.formats.ElementGrid.round does it. */
static inline float grid_round(float a, int emin, int mbits, float max) {
    int e = exponent_field(a);
    e = e < emin ? emin : e;
    const float step = pow2i(e - mbits);
    const float r = nearbyintf(a / step) * step;
    return r > max ? max : r;
}

/* The scale of one unit with abs-max `amax`; `g` is the sequence's NVFP4 tensor scale. */
static float unit_scale(const ks_term* k, float amax, float g) {
    if (amax != amax && (k->form == KS_E8M0_FLOOR || k->form == KS_E8M0_RCEIL)) return NAN;
    switch (k->form) {
    case KS_E8M0_FLOOR:
        return pow2i(clamp_e8m0(exponent_field(amax) - k->emax));
    case KS_E8M0_RCEIL: {
        int e;
        const float m = frexpf(amax / k->divisor, &e);
        e = m == 0.5f ? e - 1 : e;
        return pow2i(clamp_e8m0(m > 0.0f ? e : -127));
    }
    case KS_NVFP4: {
        float ratio = g > 0.0f ? amax / k->divisor / g : 0.0f;
        ratio = ratio < k->inner_min ? k->inner_min : (ratio > k->inner_max ? k->inner_max : ratio);
        return g * grid_round(ratio, k->inner_emin, k->inner_mbits, k->inner_max);
    }
    default: {
        const float s = amax / k->divisor;
        return s < k->floor_ ? k->floor_ : s;
    }
    }
}

/* ---- thresholds: |x / s| against tau as one comparison of |x| ------------------------------------- */

/* The largest float k with fl(k / s) <= tau (s > 0, a zero scale taken as 1 by the caller): |x| <= k
 * holds exactly where |x / s| <= tau. For a normal tau·s the product is exact (tau is a power of two)
 * and is k itself: the next float above it divides to more than half an ulp above tau, so it rounds
 * up. Below the normal range the few floats around it are tried. */
/* The neighbours of a non-negative finite float. */
static inline float next_up(float f) { return bitsf(fbits(f) + 1u); }
static inline float next_down(float f) { return f > 0.0f ? bitsf(fbits(f) - 1u) : 0.0f; }

static inline float at_most(float s, float tau) {
    if (!(s < INFINITY)) return FLT_MAX;
    float k = tau * s;
    if (k >= FLT_MIN) return k;
    while (k > 0.0f && !(k / s <= tau)) k = next_down(k);
    for (;;) {
        const float up = next_up(k);
        if (!(up / s <= tau)) return k;
        k = up;
    }
}

/* The largest float h with fl(h / s) < hi: |x| <= h holds exactly where |x / s| < hi. */
static inline float below_of(float s, float hi) {
    if (!(s < INFINITY)) return FLT_MAX;
    float h = hi * s;
    if (!(h <= FLT_MAX)) h = FLT_MAX;
    while (h > 0.0f && !(h / s < hi)) h = next_down(h);
    for (;;) {
        const float up = next_up(h);
        if (!(up <= FLT_MAX) || !(up / s < hi)) return h;
        h = up;
    }
}

/* Kernel bounds are compared as floats: a NaN element fails every comparison; an infinite one fails
 * too, because a bound that overflowed to +Inf is lowered to the largest finite float (which still
 * admits every finite element). */
static inline float capped(float bound) { return bound > FLT_MAX ? FLT_MAX : bound; }

/* Histogram bin of a zero bound b >= 0: how many of the interior edges are <= b (torch.searchsorted with
 * right=True over the same float64 edges). For each run of 2^16 consecutive float32 bit patterns (1/128
 * of an octave, narrower than a bin) table[run] holds that count at the run's first value and
 * table[65536 + run] the bits of the smallest float32 at or above the one edge that may follow within
 * the run (all ones if none). */
static inline int bin_of(float b, const int32_t* table) {
    const uint32_t bits = fbits(b), run = bits >> 16;
    return table[run] + (bits >= (uint32_t)table[65536 + run]);
}

/* The histogram (groups, nbins) of `groups` rows of n float32 values each, every value standing for
 * `weight` items, in the bins of bin_of: a negative value (or -0) in the first bin and NaN in the last,
 * where torch.searchsorted over the float64 edges puts them. */
void ks_histogram(const float* v, int64_t groups, int64_t n, const int32_t* table, int nbins, int64_t weight,
                  int64_t* out) {
    for (int64_t i = 0; i < groups * (int64_t)nbins; i++) out[i] = 0;
    for (int64_t g = 0; g < groups; g++) {
        int64_t* h = out + g * nbins;
        for (int64_t i = 0; i < n; i++) {
            const uint32_t bits = fbits(v[g * n + i]);
            const int bin = (bits & ABS_MASK) > INF_BITS ? nbins - 1 : (bits >> 31 ? 0 : bin_of(v[g * n + i], table));
            h[bin] += weight;
        }
    }
}

/* ---- per-element counts -------------------------------------------------------------------------- */

/* In one reading of a row: its finite elements, and those with |x| <= bound0 and <= bound1 (a bound
 * of -1 admits nothing). */
static void row_counts(const float* restrict x, int64_t n, float bound0, float bound1, int32_t* finite,
                       int32_t* k0, int32_t* k1) {
    int32_t f = 0, a = 0, b = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, x + j, sizeof bits);
        f += (bits & ABS_MASK) < INF_BITS;
        const float ax = fabsf(x[j]);
        a += ax <= bound0;
        b += ax <= bound1;
    }
    *finite = f;
    *k0 = a;
    *k1 = b;
}

/* The same two counts without the finite ones (known from an earlier reading of the row). */
static void row_counts2(const float* restrict x, int64_t n, float bound0, float bound1, int32_t* k0, int32_t* k1) {
    int32_t a = 0, b = 0;
    for (int64_t j = 0; j < n; j++) {
        const float ax = fabsf(x[j]);
        a += ax <= bound0;
        b += ax <= bound1;
    }
    *k0 = a;
    *k1 = b;
}

static int32_t count_at_most(const float* restrict x, const float* restrict bound, int64_t n) {
    int32_t k = 0;
    for (int64_t j = 0; j < n; j++) k += fabsf(x[j]) <= bound[j];
    return k;
}

static int32_t count_span(const float* restrict x, int64_t n, float bound) {
    int32_t k = 0;
    for (int64_t j = 0; j < n; j++) k += fabsf(x[j]) <= bound;
    return k;
}

static int32_t below_col(const float* restrict step, int64_t n, float per_token) {
    int32_t k = 0;
    for (int64_t j = 0; j < n; j++) k += step[j] < per_token;
    return k;
}

/* Separable step max(row · col / q, floor), as kernelscope.quant.separable_step evaluates it, for a
 * row where row · col can reach +Inf: the bound tau·step is capped. Without a per-token step, `below`
 * is counted against p = -Inf: nothing is below it. */
static void kernel_sep(const float* restrict x, const float* restrict col, int64_t n, float row, float q,
                       float floor_, float tau, float p, int32_t* kernel, int32_t* below) {
    int32_t k = 0, b = 0;
    for (int64_t j = 0; j < n; j++) {
        float step = row * col[j] / q;
        step = step < floor_ ? floor_ : step;
        k += fabsf(x[j]) <= capped(tau * step);
        b += step < p;
    }
    *kernel = k;
    *below = b;
}

/*
 * The same counts for rows where row · col stays finite, for two terms sharing their factors (one
 * quantizer at two widths: the product is formed once; a lone term passes itself twice, which costs
 * no measurable time). Bounds are compared directly: tau · max(p / q, floor) equals
 * max(p / (q / tau), tau · floor) bit for bit, since scaling by a power of two commutes with rounding
 * wherever the result can exceed tau · floor, and below that both sides are tau · floor. A finite
 * bound needs no cap, and an infinite |x| fails every comparison with it. h = q / tau and hp the
 * per-token step times tau (-Inf: no below count).
 */
static void kernel_sep2(const float* restrict x, const float* restrict col, int64_t n, float row,
                        float h0, float h1, float f0, float f1, float hp0, float hp1, int32_t* out) {
    int32_t k0 = 0, k1 = 0, b0 = 0, b1 = 0;
    for (int64_t j = 0; j < n; j++) {
        const float product = row * col[j];
        float half0 = product / h0, half1 = product / h1;
        half0 = half0 < f0 ? f0 : half0;
        half1 = half1 < f1 ? f1 : half1;
        const float ax = fabsf(x[j]);
        k0 += ax <= half0;
        k1 += ax <= half1;
        b0 += half0 < hp0;
        b1 += half1 < hp1;
    }
    out[0] = k0;
    out[1] = k1;
    out[2] = b0;
    out[3] = b1;
}

static inline float per_token_step(float t, float qmax, float floor_) {
    const float step = t / qmax;
    return step < floor_ ? floor_ : step;
}

/* What one thread accumulates, merged into the outputs at the end. */
typedef struct {
    int64_t counts[KS_MAX_TERMS][KS_NCOUNTS];
    float bmin[KS_MAX_TERMS], bmax[KS_MAX_TERMS];
    int64_t bad;
} ks_local;

/* The abs-max of each block of a row (non-finite as 0) and whether the block holds a non-finite one.
 * Blocks of 16 and 32 have loops of their own, so that each block is a few vector operations. */
static inline void block_max_of(const uint32_t* restrict xb, int64_t len, float* restrict bm, uint8_t* restrict bad) {
    uint32_t m = 0, nonfinite = 0;
    #pragma omp simd reduction(max : m) reduction(| : nonfinite)
    for (int64_t j = 0; j < len; j++) {
        uint32_t v = xb[j] & ABS_MASK;
        const uint32_t keep = -(uint32_t)(v < INF_BITS);
        nonfinite |= ~keep;
        v &= keep;
        m = m < v ? v : m;
    }
    *bm = bitsf(m);
    *bad = nonfinite != 0;
}

static inline ks_v8i abs_bits8(const uint32_t* p) {
    ks_v8i v;
    memcpy(&v, p, sizeof v);
    return v & (int32_t)ABS_MASK; /* |x| bits: below 2^31, so they compare as signed */
}

KS_ROW static void block_maxima(const uint32_t* restrict xb, int64_t I, int64_t size, int finite_row,
                                float* restrict bm, uint8_t* restrict bad) {
    int64_t b = 0, start = 0;
    if (finite_row && size % 8 == 0) { /* eight lanes a step, one lane maximum a block; no flags to keep */
#ifdef KS_SHUFFLES
        for (; start + 8 * size <= I; start += 8 * size, b += 8) { /* eight blocks' lane maxima at once */
            ks_v8i m[8];
            for (int k = 0; k < 8; k++) {
                m[k] = abs_bits8(xb + start + k * size);
                for (int64_t j = 8; j < size; j += 8) m[k] = vmax(m[k], abs_bits8(xb + start + k * size + j));
            }
            const ks_v8i top = lane_max8(m);
            memcpy(bm + b, &top, sizeof top);
            memset(bad + b, 0, 8);
        }
#endif
        for (; start + size <= I; start += size, b++) {
            ks_v8i m = abs_bits8(xb + start);
            for (int64_t j = 8; j < size; j += 8) {
                m = vmax(m, abs_bits8(xb + start + j));
            }
            bm[b] = bitsf((uint32_t)lane_max(m));
            bad[b] = 0;
        }
    }
    for (; start < I; start += size, b++) block_max_of(xb + start, I - start < size ? I - start : size, bm + b, bad + b);
}

/* The scales of nb blocks from their maxima (kernelscope.quant.formats.scale_of), one loop per form so
 * that each can vectorise. */
KS_ROW static void block_scales(const ks_term* k, const float* restrict bm, int64_t nb, float g, float* restrict sc) {
    if (k->form == KS_E8M0_FLOOR) {
        for (int64_t b = 0; b < nb; b++) sc[b] = pow2i(clamp_e8m0(exponent_field(bm[b]) - k->emax));
    } else if (k->form == KS_NVFP4 && g > 0.0f) {
        /* amax / divisor / g clamped to [inner_min, inner_max], a normal E4M3 range: its rounding
         * step 2^(e - mbits) is a normal float */
        const float lo = k->inner_min, hi = k->inner_max, div = k->divisor;
        const int emin = k->inner_emin, mbits = k->inner_mbits;
        for (int64_t b = 0; b < nb; b++) {
            float r = bm[b] / div / g;
            r = r < lo ? lo : (r > hi ? hi : r);
            int e = exponent_field(r);
            e = e < emin ? emin : e;
            const float step = bitsf((uint32_t)(e - mbits + 127) << 23);
            float q = nearbyintf(r / step) * step;
            q = q > hi ? hi : q;
            sc[b] = g * q;
        }
    } else if (k->form == KS_E8M0_RCEIL) {
        /* 2^ceil(log2 r) for r = amax / divisor, as unit_scale's frexpf gives it, from r's bits: a
         * normal r rounds its exponent up unless its mantissa is zero; a subnormal one lies at or
         * below 2^-126, and so at -126 above 2^-127 and at the clamp's -127 from there down */
        const float div = k->divisor;
        for (int64_t b = 0; b < nb; b++) {
            const uint32_t r = fbits(bm[b] / div);
            const int32_t field = (int32_t)(r >> 23);
            const int32_t e = field == 0 ? (r > 0x00400000u ? -126 : -127)
                                         : field - 127 + (int32_t)((r & 0x007FFFFFu) != 0);
            sc[b] = pow2i(clamp_e8m0(e));
        }
    } else if (k->form == KS_ABSMAX) {
        const float div = k->divisor, lo = k->floor_;
        for (int64_t b = 0; b < nb; b++) {
            const float s = bm[b] / div;
            sc[b] = s < lo ? lo : s;
        }
    } else {
        for (int64_t b = 0; b < nb; b++) sc[b] = unit_scale(k, bm[b], g);
    }
}

/* Elements with |x| <= k among n. */
static inline int32_t span_at_most(const float* restrict x, int64_t n, float k) {
    int32_t c = 0;
    #pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < n; j++) c += fabsf(x[j]) <= k;
    return c;
}


static inline ks_v8f abs8(const float* p) {
    ks_v8i v;
    memcpy(&v, p, sizeof v);
    v &= (int32_t)ABS_MASK;
    ks_v8f f;
    memcpy(&f, &v, sizeof f);
    return f;
}

#ifdef __AVX512F__
#define KS_MASKS 1
/* Sixteen lanes: |x| of 16 floats, the mask of those at most a bound, and a count kept in each lane,
 * raised where a mask is set (one masked add, where eight-lane code compares, converts and subtracts). */
static inline __m512 abs16(const float* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32((int32_t)ABS_MASK)));
}

static inline __mmask16 le16(__m512 a, float bound) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(bound), _CMP_LE_OQ); }

static inline __m512i count_if(__m512i acc, __mmask16 m) {
    return _mm512_mask_add_epi32(acc, m, acc, _mm512_set1_epi32(1));
}

/* blocked_counts' whole blocks for a `size` that is a multiple of 16, sixteen elements a comparison:
 * returns how many blocks it counted (a short last block is left to the caller). */
KS_ROW static int64_t whole_block_counts(const float* restrict x, int64_t I, int64_t size, const float* restrict k,
                                          const float* restrict h, int64_t* nk, int64_t* nh) {
    int64_t b = 0;
    __m512i ak = _mm512_setzero_si512(), ah = ak;
    for (int64_t start = 0; start + size <= I; start += size, b++) {
        if (h != NULL)
            for (int64_t j = 0; j < size; j += 16) {
                const __m512 a = abs16(x + start + j);
                ak = count_if(ak, le16(a, k[b]));
                ah = count_if(ah, le16(a, h[b]));
            }
        else
            for (int64_t j = 0; j < size; j += 16) ak = count_if(ak, le16(abs16(x + start + j), k[b]));
    }
    *nk = _mm512_reduce_add_epi32(ak);
    *nh = _mm512_reduce_add_epi32(ah);
    return b;
}
#endif

/* Elements with |x| <= k[block] and, with h, with |x| <= h[block], over a row of blocks of `size`:
 * for sizes that are multiples of 16 on AVX-512, or of 8, sixteen or eight counts at a time kept
 * across blocks and added up once. */
KS_ROW static void blocked_counts(const float* restrict x, int64_t I, int64_t size, const float* restrict k,
                                  const float* restrict h, int64_t* nk, int64_t* nh) {
    int64_t b = 0, start = 0, tk = 0, th = 0;
#ifdef KS_MASKS
    if (size % 16 == 0) {
        b = whole_block_counts(x, I, size, k, h, &tk, &th);
        start = b * size;
    } else
#endif
    if ((size == 16 || size == 32) && h != NULL) { /* whole blocks unrolled */
        ks_v8i ak = {0}, ah = {0};
        for (; start + size <= I; start += size, b++) {
            const ks_v8f kb = KS_SPLAT(k[b]), hb = KS_SPLAT(h[b]);
            for (int j = 0; j < (size == 16 ? 16 : 32); j += 8) {
                const ks_v8f a = abs8(x + start + j);
                ak -= a <= kb;
                ah -= a <= hb;
            }
        }
        for (int j = 0; j < 8; j++) {
            tk += ak[j];
            th += ah[j];
        }
    } else if (size == 16 || size == 32) {
        ks_v8i ak = {0};
        for (; start + size <= I; start += size, b++) {
            const ks_v8f kb = KS_SPLAT(k[b]);
            for (int j = 0; j < (size == 16 ? 16 : 32); j += 8) ak -= abs8(x + start + j) <= kb;
        }
        for (int j = 0; j < 8; j++) tk += ak[j];
    } else if (size % 8 == 0) {
        ks_v8i ak = {0}, ah = {0};
        if (h == NULL)
            for (; start + size <= I; start += size, b++) {
                const ks_v8f kb = KS_SPLAT(k[b]);
                for (int64_t j = 0; j < size; j += 8) ak -= abs8(x + start + j) <= kb; /* true is -1 */
            }
        else
            for (; start + size <= I; start += size, b++) {
                const ks_v8f kb = KS_SPLAT(k[b]), hb = KS_SPLAT(h[b]);
                for (int64_t j = 0; j < size; j += 8) {
                    const ks_v8f a = abs8(x + start + j);
                    ak -= a <= kb;
                    ah -= a <= hb;
                }
            }
        for (int j = 0; j < 8; j++) {
            tk += ak[j];
            th += ah[j];
        }
    }
    for (; start < I; start += size, b++) {
        const int64_t len = I - start < size ? I - start : size;
        tk += span_at_most(x + start, len, k[b]);
        if (h != NULL) th += span_at_most(x + start, len, h[b]);
    }
    *nk = tk;
    *nh = th;
}

/* Per-thread room for the blocks of one row. */
typedef struct {
    float *fine, *bm, *sc, *kthr, *hthr, *bound;
    uint8_t *fine_bad, *bad;
} ks_rowbuf;

/* The maxima (and non-finite flags) of blocks of `factor` consecutive fine blocks, from those of the
 * nb fine blocks; a finite row's flags are all clear. */
KS_ROW static void coarser_maxima(const float* restrict fine, const uint8_t* restrict fine_bad, int64_t nb,
                                  int64_t factor, int finite_row, float* restrict bm, uint8_t* restrict bad) {
    const uint32_t* restrict bits = (const uint32_t*)fine; /* non-negative floats order like their bits */
    uint32_t* restrict out = (uint32_t*)bm;
    if (factor == 1) {
        memcpy(bm, fine, (size_t)nb * sizeof *bm);
        memcpy(bad, fine_bad, (size_t)nb);
        return;
    }
    const int64_t coarse = (nb + factor - 1) / factor;
    for (int64_t b = 0; b < coarse; b++) {
        const int64_t end = (b + 1) * factor < nb ? (b + 1) * factor : nb;
        uint32_t m = 0;
        for (int64_t j = b * factor; j < end; j++) m = bits[j] > m ? bits[j] : m;
        out[b] = m;
    }
    if (finite_row) {
        memset(bad, 0, (size_t)coarse);
        return;
    }
    for (int64_t b = 0; b < coarse; b++) {
        uint8_t flag = 0;
        const int64_t end = (b + 1) * factor < nb ? (b + 1) * factor : nb;
        for (int64_t j = b * factor; j < end; j++) flag |= fine_bad[j];
        bad[b] = flag;
    }
}

/* Each block's kernel threshold: tau · s where that product is a normal float (exact, see at_most),
 * and the subnormal code's top |x| (below_of): the float below sub_hi · s when that is what the
 * division decides, both checked in a loop that vectorises and searched only where they fail. */
KS_ROW static void block_thresholds(const ks_term* term, const float* restrict sc, int64_t nb, int sub,
                             float* restrict kthr, float* restrict hthr) {
    const float tau = term->tau, hi = term->sub_hi;
    int32_t fix = 0;
    for (int64_t b = 0; b < nb; b++) {
        const float safe = sc[b] + (float)(sc[b] == 0.0f); /* a zero scale (an all-zero unit) as 1 */
        const float k0 = tau * safe;
        kthr[b] = k0;
        fix |= (k0 < FLT_MIN) | (safe > FLT_MAX);
    }
    if (fix)
        for (int64_t b = 0; b < nb; b++)
            if (kthr[b] < FLT_MIN || sc[b] > FLT_MAX) kthr[b] = at_most(sc[b] == 0.0f ? 1.0f : sc[b], tau);
    if (!sub) return;
    if (power_of_two_scales(term->form)) {
        /* A power-of-two scale: hi · s is exact wherever it is normal, and so is h / s for every h
         * near it, so h is the float just below hi · s; the others are searched as below. */
        int32_t odd = 0;
        for (int64_t b = 0; b < nb; b++) {
            const float safe = sc[b] + (float)(sc[b] == 0.0f);
            const float top = hi * safe;
            hthr[b] = bitsf(fbits(top) - 1u);
            odd |= (top < FLT_MIN) | (safe > FLT_MAX);
        }
        if (odd)
            for (int64_t b = 0; b < nb; b++) {
                const float safe = sc[b] == 0.0f ? 1.0f : sc[b];
                if (hi * safe < FLT_MIN || safe > FLT_MAX) hthr[b] = below_of(safe, hi);
            }
        return;
    }
    /* h: the largest float whose quotient stays below hi, within two floats below hi · s (whose
     * quotient is hi up to an ulp): since the quotient rises with the float, the count of the two
     * candidates above the lowest whose quotient is below hi is h's distance from that lowest one,
     * wherever the candidates bracket h (the lowest below hi, the one above hi · s not) */
    int32_t off = 0;
    for (int64_t b = 0; b < nb; b++) {
        const float safe = sc[b] + (float)(sc[b] == 0.0f);
        const uint32_t u = fbits(hi * safe);
        const int32_t q0 = bitsf(u) / safe < hi, q1 = bitsf(u - 1u) / safe < hi;
        const int32_t q2 = bitsf(u - 2u) / safe < hi, up = bitsf(u + 1u) / safe < hi;
        hthr[b] = bitsf(u - 2u + (uint32_t)q1 + (uint32_t)q0);
        off |= up | (q2 ^ 1) | (bitsf(u) < FLT_MIN) | (safe > FLT_MAX);
    }
    if (off)
        for (int64_t b = 0; b < nb; b++) {
            const float safe = sc[b] == 0.0f ? 1.0f : sc[b];
            const uint32_t u = fbits(hi * safe);
            if (bitsf(u + 1u) / safe < hi || !(bitsf(u - 2u) / safe < hi) || bitsf(u) < FLT_MIN || safe > FLT_MAX)
                hthr[b] = below_of(safe, hi);
        }
}

/* The blocks of one row for one block term: its scales from the blocks' maxima, their thresholds, the
 * counts, and the zero bound's extremes, row sum and histogram. */
KS_ROW static void count_blocks(const float* restrict xr, int64_t I, int finite_row, const ks_rowbuf* rb,
                                float t_row, float g, const ks_term* term, int k, const int32_t* table, int nbins,
                                float step_floor, ks_local* acc, int64_t* restrict hist, int nslots, double* rowsum) {
    const int64_t size = term->block;
    const int64_t nb = (I + size - 1) / size, last = I - (nb - 1) * size;
    const int sub = term->sub_hi > 0.0f;
    const float tau = term->tau;
    const float* restrict sc = rb->sc;
    int64_t* c = acc->counts[k];
    block_scales(term, rb->bm, nb, g, rb->sc);
    block_thresholds(term, sc, nb, sub, rb->kthr, rb->hthr);
    int64_t whole = 0, kern, below_normal;
    if (finite_row) { /* no flags to read: a loop that vectorises */
        const float* restrict bm = rb->bm;
        const float* restrict kthr = rb->kthr;
        for (int64_t b = 0; b < nb; b++) whole += bm[b] <= kthr[b]; /* |x / s| rises with |x| */
    } else {
        for (int64_t b = 0; b < nb; b++) whole += (rb->bm[b] <= rb->kthr[b]) & !rb->bad[b];
    }
    c[KS_KERNEL_BLOCKS] += whole;
    blocked_counts(xr, I, size, rb->kthr, sub ? rb->hthr : NULL, &kern, &below_normal);
    c[KS_KERNEL] += kern;
    if (sub) c[KS_SUBNORMAL] += below_normal - kern;
    if (term->below_qmax > 0.0f) {
        const float p = per_token_step(t_row, term->below_qmax, step_floor);
        int64_t below = 0;
        for (int64_t b = 0; b < nb - 1; b++) below += sc[b] < p;
        c[KS_BELOW] += below * size + (sc[nb - 1] < p ? last : 0);
    }
    /* The zero bound tau·s of each block, standing for its elements: extremes, the row's sum (eight
     * running sums, each added in block order, then added in lane order: the same whatever the
     * threads) and the histogram. */
    float* restrict bounds = rb->bound;
    for (int64_t b = 0; b < nb; b++) bounds[b] = tau * sc[b];
    /* extremes on the bit patterns: the bounds are non-negative floats, which order like their bits */
    int32_t lo = INT32_MAX, top = 0;
    const int32_t* restrict bound_bits = (const int32_t*)bounds;
    for (int64_t b = 0; b < nb; b++) {
        lo = bound_bits[b] < lo ? bound_bits[b] : lo;
        top = bound_bits[b] > top ? bound_bits[b] : top;
    }
    acc->bmin[k] = bitsf((uint32_t)lo) < acc->bmin[k] ? bitsf((uint32_t)lo) : acc->bmin[k];
    acc->bmax[k] = bitsf((uint32_t)top) > acc->bmax[k] ? bitsf((uint32_t)top) : acc->bmax[k];
    double lanes[8] = {0};
    int64_t b8 = 0;
    for (; b8 + 8 <= nb - 1; b8 += 8)
        for (int j = 0; j < 8; j++) lanes[j] += (double)bounds[b8 + j];
    for (int64_t b = b8; b < nb - 1; b++) lanes[b - b8] += (double)bounds[b];
    double sum = 0.0;
    for (int j = 0; j < 8; j++) sum += lanes[j];
    *rowsum = sum * (double)size + (double)bounds[nb - 1] * (double)last;
    /* Neighbouring blocks mostly share a bin, and adds to one counter one after the other would each
     * wait for the one before: block b goes to copy b % 4 of the histogram. */
    const int64_t copy = (int64_t)nslots * nbins;
    int64_t* h = hist + (int64_t)term->slot * nbins;
    int64_t b4 = 0;
    for (; b4 + 4 <= nb - 1; b4 += 4) {
        h[bin_of(bounds[b4], table)] += size;
        h[copy + bin_of(bounds[b4 + 1], table)] += size;
        h[2 * copy + bin_of(bounds[b4 + 2], table)] += size;
        h[3 * copy + bin_of(bounds[b4 + 3], table)] += size;
    }
    for (int64_t b = b4; b < nb - 1; b++) h[bin_of(bounds[b], table)] += size;
    h[bin_of(bounds[nb - 1], table)] += last;
}

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static int block_slots(int n, const ks_term* terms) {
    int slots = 0;
    for (int k = 0; k < n; k++) slots += terms[k].layout == KS_BLOCK;
    return slots;
}

/* Copies of the histograms each thread keeps: four where there are block terms (see count_blocks). */
static int hist_copies(int n, const ks_term* terms) { return block_slots(n, terms) > 0 ? 4 : 1; }

/* Scratch each thread keeps: a widened bfloat16 row, the blocks' maxima (at the smallest size and at
 * one other), their flags, scales, two thresholds and bounds, and `copies` histograms per block term. */
static size_t thread_bytes(int dtype, int64_t I, int slots, int nbins, int copies) {
    return align64((dtype == KS_F32 ? 0 : (size_t)I) * 4) + 6 * align64((size_t)I * 4) + 2 * align64((size_t)I)
           + (size_t)copies * (size_t)slots * (size_t)nbins * 8;
}

/* The scratch every thread shares: each sequence's max t, per-column and per-sequence scales and
 * thresholds, separable terms' column maxima, and each block term's row sums of the bound. */
static size_t shared_bytes(int64_t S, int64_t T, int64_t I, int n, const ks_term* terms) {
    size_t floats = (size_t)S;
    for (int k = 0; k < n; k++) {
        if (terms[k].layout == KS_CHANNEL) floats += 3 * (size_t)(S * I);
        else if (terms[k].layout == KS_TENSOR) floats += 3 * (size_t)S;
        else if (terms[k].layout == KS_SEP) floats += (size_t)S;
    }
    return align64(floats * 4) + (size_t)block_slots(n, terms) * (size_t)(S * T) * 8;
}

/* Bytes of scratch ks_count needs besides its outputs; the caller provides it, so that nothing here
 * allocates while a model's activations come and go. */
int64_t ks_count_scratch(int dtype, int64_t S, int64_t T, int64_t I, int nterms, const ks_term* terms,
                         int nbins, int threads) {
    if (threads < 1) threads = 1;
    return (int64_t)(shared_bytes(S, T, I, nterms, terms)
                     + (size_t)threads * thread_bytes(dtype, I, block_slots(nterms, terms), nbins, hist_copies(nterms, terms))) + 128;
}

/*
 * x (S, T, I) row-major, t (S, T) its token maxima and c (S, I) its channel maxima (ks_ranges).
 * For each of the n terms: counts[k][KS_KERNEL ... KS_KERNEL_BLOCKS]. A KS_SEP term k reads its
 * factors rows[k] (S, T) and cols[k] (S, I). Block terms also give, in row `slot` of bounds
 * (slots, 2 + S) and hist (slots, nbins): the smallest and largest zero bound tau·s, each sequence's
 * sum of the bound over its elements, and the histogram (by elements) of nbins bins, read from the bin
 * table (bin_of). nonfinite[0]: the NaN and ±Inf elements. Returns 0, or 2 with too many
 * terms.
 */
int ks_count(const void* x, int dtype, int64_t S, int64_t T, int64_t I, const float* t, const float* c,
             int n, const ks_term* terms, const float* const* rows, const float* const* cols,
             const int32_t* table, int nbins, float step_floor, int64_t* counts,
             double* bounds, int64_t* hist, int64_t* nonfinite, int threads, void* scratch_) {
    if (n > KS_MAX_TERMS) return 2;
    if (threads < 1) threads = 1;
    char* scratch = (char*)(((uintptr_t)scratch_ + 63) & ~(uintptr_t)63);
    float* next = (float*)scratch;
    float* tmax = next; /* each sequence's max t */
    next += S;
    for (int64_t s = 0; s < S; s++) {
        float m = 0.0f;
        for (int64_t i = 0; i < T; i++) m = t[s * T + i] > m ? t[s * T + i] : m;
        tmax[s] = m;
    }
    /* Per-column and per-sequence scales and their two thresholds, and each separable term's largest
     * column factor per sequence. */
    const float* chan[KS_MAX_TERMS][3] = {{0}};
    const float* seqv[KS_MAX_TERMS][3] = {{0}};
    const float* sepmax[KS_MAX_TERMS] = {0};
    int nslots = 0, partner[KS_MAX_TERMS];
    for (int k = 0; k < n; k++) partner[k] = -1;
    for (int k = 0; k < n; k++) {
        const ks_term* term = terms + k;
        if (term->layout == KS_CHANNEL || term->layout == KS_TENSOR) {
            const int64_t len = term->layout == KS_CHANNEL ? S * I : S;
            float* sc = next;
            float* kb = sc + len;
            float* hb = kb + len;
            next += 3 * len;
            for (int64_t j = 0; j < len; j++) {
                sc[j] = unit_scale(term, term->layout == KS_CHANNEL ? c[j] : tmax[j], 0.0f);
                const float safe = sc[j] == 0.0f ? 1.0f : sc[j];
                kb[j] = at_most(safe, term->tau);
                hb[j] = term->sub_hi > 0.0f ? below_of(safe, term->sub_hi) : -1.0f;
            }
            const float** into = term->layout == KS_CHANNEL ? chan[k] : seqv[k];
            into[0] = sc;
            into[1] = kb;
            into[2] = hb;
        } else if (term->layout == KS_SEP) {
            float* cm = next;
            next += S;
            for (int64_t s = 0; s < S; s++) {
                float m = 0.0f;
                for (int64_t j = 0; j < I; j++) m = cols[k][s * I + j] > m ? cols[k][s * I + j] : m;
                cm[s] = m;
            }
            sepmax[k] = cm;
            if (partner[k] == -1)
                for (int k2 = k + 1; k2 < n; k2++)
                    if (terms[k2].layout == KS_SEP && partner[k2] == -1 && rows[k2] == rows[k] && cols[k2] == cols[k]
                        && terms[k2].tau == term->tau && terms[k2].floor_ == term->floor_) {
                        partner[k] = k2;
                        partner[k2] = -2;
                        break;
                    }
        } else if (term->layout == KS_BLOCK) {
            nslots = term->slot + 1 > nslots ? term->slot + 1 : nslots;
        }
    }
    /* Block terms grouped by block size, each group's members in term order; `base` the smallest size. */
    int groups = 0, filled = 0, gstart[KS_MAX_TERMS + 1], gmember[KS_MAX_TERMS], taken[KS_MAX_TERMS] = {0};
    int64_t base = I;
    gstart[0] = 0;
    for (int k = 0; k < n; k++) {
        if (terms[k].layout == KS_BLOCK && terms[k].block < base) base = terms[k].block;
        if (terms[k].layout != KS_BLOCK || taken[k]) continue;
        for (int k2 = k; k2 < n; k2++)
            if (terms[k2].layout == KS_BLOCK && !taken[k2] && terms[k2].block == terms[k].block) {
                taken[k2] = 1;
                gmember[filled++] = k2;
            }
        gstart[++groups] = filled;
    }
    double* rowsums = (double*)(scratch + align64((size_t)((char*)next - scratch))); /* (slots, S·T) */
    char* per_thread = scratch + shared_bytes(S, T, I, n, terms);
    const int copies = hist_copies(n, terms);
    const size_t my_bytes = thread_bytes(dtype, I, nslots, nbins, copies);

    for (int k = 0; k < n; k++)
        for (int f = 0; f < KS_NCOUNTS; f++) counts[k * KS_NCOUNTS + f] = 0;
    for (int sl = 0; sl < nslots; sl++) {
        bounds[sl * (2 + S)] = INFINITY;
        bounds[sl * (2 + S) + 1] = -INFINITY;
        for (int64_t s = 0; s < S; s++) bounds[sl * (2 + S) + 2 + s] = 0.0;
        for (int b = 0; b < nbins; b++) hist[(int64_t)sl * nbins + b] = 0;
    }
    *nonfinite = 0;
    const int64_t nrows = S * T;
    #pragma omp parallel num_threads(threads)
    {
        char* mine = per_thread + (size_t)omp_get_thread_num() * my_bytes;
        float* buf = (float*)mine;
        char* at = mine + align64((dtype == KS_F32 ? 0 : (size_t)I) * 4);
        ks_rowbuf rb;
        float** floats[6] = {&rb.fine, &rb.bm, &rb.sc, &rb.kthr, &rb.hthr, &rb.bound};
        for (int i = 0; i < 6; i++, at += align64((size_t)I * 4)) *floats[i] = (float*)at;
        rb.fine_bad = (uint8_t*)at;
        rb.bad = (uint8_t*)(at + align64((size_t)I));
        int64_t* my_hist = (int64_t*)(at + 2 * align64((size_t)I));
        memset(my_hist, 0, (size_t)copies * (size_t)nslots * (size_t)nbins * sizeof(int64_t));
        ks_local acc;
        memset(&acc, 0, sizeof acc);
        for (int k = 0; k < n; k++) {
            acc.bmin[k] = INFINITY;
            acc.bmax[k] = -INFINITY;
        }
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < nrows; g++) {
            const int64_t s = g / T;
            const float* xr = (const float*)x + g * I;
            if (dtype != KS_F32) {
                bf16_abs_bits((const uint16_t*)x + g * I, (uint32_t*)buf, I);
                xr = buf;
            }
            const uint32_t* xb = (const uint32_t*)xr;
            /* Per-row bounds first (counted two at a time with the non-finite elements): each term's
             * kernel bound, and for a float grid the largest |x| short of a normal code. */
            float p[KS_MAX_TERMS], rowbound[2 * KS_MAX_TERMS + 2];
            int rowterm[2 * KS_MAX_TERMS + 2], rowfield[2 * KS_MAX_TERMS + 2], nrow = 0;
            for (int k = 0; k < n; k++) {
                const ks_term* term = terms + k;
                p[k] = term->below_qmax > 0.0f ? per_token_step(t[g], term->below_qmax, step_floor) : -INFINITY;
                if (term->layout != KS_TOKEN && term->layout != KS_TENSOR) continue;
                float scale, kb, hb;
                if (term->layout == KS_TOKEN) {
                    scale = unit_scale(term, t[g], 0.0f);
                    const float safe = scale == 0.0f ? 1.0f : scale;
                    kb = at_most(safe, term->tau);
                    hb = term->sub_hi > 0.0f ? below_of(safe, term->sub_hi) : -1.0f;
                } else {
                    scale = seqv[k][0][s];
                    kb = seqv[k][1][s];
                    hb = seqv[k][2][s];
                }
                if (scale < p[k]) acc.counts[k][KS_BELOW] += I;
                rowterm[nrow] = k;
                rowfield[nrow] = KS_KERNEL;
                rowbound[nrow++] = kb;
                if (term->sub_hi > 0.0f) {
                    rowterm[nrow] = k;
                    rowfield[nrow] = KS_SUBNORMAL;
                    rowbound[nrow++] = hb;
                }
            }
            rowterm[nrow] = rowterm[nrow + 1] = -1;
            rowbound[nrow] = rowbound[nrow + 1] = -1.0f; /* admits nothing: pads an odd count */
            int32_t got[2 * KS_MAX_TERMS + 2], row_finite = 1;
            int32_t finite;
            row_counts(xr, I, rowbound[0], rowbound[1], &finite, &got[0], &got[1]);
            acc.bad += I - finite;
            row_finite = finite == I;
            for (int r = 2; r < nrow; r += 2) row_counts2(xr, I, rowbound[r], rowbound[r + 1], &got[r], &got[r + 1]);
            for (int r = 0; r < nrow; r++) {
                /* a subnormal bound follows its kernel bound: the elements between the two */
                acc.counts[rowterm[r]][rowfield[r]] += rowfield[r] == KS_SUBNORMAL ? got[r] - got[r - 1] : got[r];
            }
            for (int k = 0; k < n; k++) {
                const ks_term* term = terms + k;
                if (term->layout == KS_CHANNEL) {
                    int64_t* cnt = acc.counts[k];
                    const int32_t kern = count_at_most(xr, chan[k][1] + s * I, I);
                    cnt[KS_KERNEL] += kern;
                    if (term->sub_hi > 0.0f) cnt[KS_SUBNORMAL] += count_at_most(xr, chan[k][2] + s * I, I) - kern;
                    if (term->below_qmax > 0.0f) cnt[KS_BELOW] += below_col(chan[k][0] + s * I, I, p[k]);
                } else if (term->layout == KS_SEP && partner[k] != -2) {
                    const float row = rows[k][g], *col = cols[k] + s * I;
                    const int k2 = partner[k];
                    int32_t cc[4];
                    if (!(row * sepmax[k][s] < INFINITY)) { /* fl(row · col) is monotone in col */
                        kernel_sep(xr, col, I, row, term->divisor, term->floor_, term->tau, p[k], &cc[0], &cc[2]);
                        if (k2 >= 0)
                            kernel_sep(xr, col, I, row, terms[k2].divisor, terms[k2].floor_, terms[k2].tau, p[k2],
                                       &cc[1], &cc[3]);
                    } else {
                        const ks_term* other = terms + (k2 >= 0 ? k2 : k);
                        kernel_sep2(xr, col, I, row, term->divisor / term->tau, other->divisor / other->tau,
                                    term->tau * term->floor_, other->tau * other->floor_, term->tau * p[k],
                                    other->tau * p[k2 >= 0 ? k2 : k], cc);
                    }
                    acc.counts[k][KS_KERNEL] += cc[0];
                    acc.counts[k][KS_BELOW] += cc[2];
                    if (k2 >= 0) {
                        acc.counts[k2][KS_KERNEL] += cc[1];
                        acc.counts[k2][KS_BELOW] += cc[3];
                    }
                }
            }
            /* The blocks' maxima at the smallest block size, and those of every larger size that it divides
             * from them (a block of 32 is two of 16, a short last block the short rest). */
            if (groups) block_maxima(xb, I, base, row_finite, rb.fine, rb.fine_bad);
            for (int gi = 0; gi < groups; gi++) {
                const int64_t size = terms[gmember[gstart[gi]]].block;
                if (size % base == 0)
                    coarser_maxima(rb.fine, rb.fine_bad, (I + base - 1) / base, size / base, row_finite, rb.bm,
                                   rb.bad);
                else
                    block_maxima(xb, I, size, row_finite, rb.bm, rb.bad);
                for (int m = gstart[gi]; m < gstart[gi + 1]; m++) {
                    const ks_term* term = terms + gmember[m];
                    const float gseq = term->form == KS_NVFP4 ? tmax[s] / term->tensor_divisor : 0.0f;
                    count_blocks(xr, I, row_finite, &rb, t[g], gseq, term, gmember[m], table, nbins, step_floor,
                                 &acc, my_hist, nslots, rowsums + (size_t)term->slot * (size_t)nrows + (size_t)g);
                }
            }
        }
        #pragma omp critical
        {
            for (int k = 0; k < n; k++) {
                for (int f = 0; f < KS_NCOUNTS; f++) counts[k * KS_NCOUNTS + f] += acc.counts[k][f];
                if (terms[k].layout == KS_BLOCK) {
                    double* b = bounds + (size_t)terms[k].slot * (size_t)(2 + S);
                    b[0] = acc.bmin[k] < b[0] ? acc.bmin[k] : b[0];
                    b[1] = acc.bmax[k] > b[1] ? acc.bmax[k] : b[1];
                }
            }
            for (int c = 0; c < copies; c++)
                for (int64_t i = 0, n1 = (int64_t)nslots * nbins; i < n1; i++) hist[i] += my_hist[c * n1 + i];
            *nonfinite += acc.bad;
        }
    }
    /* Each sequence's bound sum, its rows added in order: the same however rows were shared. */
    for (int sl = 0; sl < nslots; sl++)
        for (int64_t s = 0; s < S; s++) {
            double sum = 0.0;
            for (int64_t i = 0; i < T; i++) sum += rowsums[(size_t)sl * (size_t)nrows + (size_t)(s * T + i)];
            bounds[sl * (2 + S) + 2 + s] = sum;
        }
    return 0;
}

/* ---- fake quantization: what kernelscope.quant.formats.quantize and dequantize do, per element ---- */

/* The largest |x| of n floats with NaN propagated (as torch's amax does it): NaN if any is NaN. */
static float raw_max(const float* restrict x, int64_t n) {
    uint32_t m = 0, nan = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t v;
        memcpy(&v, x + j, sizeof v);
        v &= ABS_MASK;
        nan |= v > INF_BITS;
        m = m < v ? v : m;
    }
    return nan ? NAN : bitsf(m);
}

/* float32 -> bfloat16, rounded to nearest even (as torch's cast), NaN kept NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t u = fbits(f);
    if ((u & ABS_MASK) > INF_BITS) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* A quotient q rounded to the term's element grid: INT levels (exponent bits 0) or a float grid. */
static inline float to_grid(float q, float max, int emin, int mbits, int is_int) {
    if (is_int) {
        const float r = nearbyintf(q);
        return r < -max ? -max : (r > max ? max : r);
    }
    float a = fabsf(q);
    a = a > 2.0f * max ? 2.0f * max : a; /* beyond 2·max every value saturates; NaN stays NaN */
    int e = exponent_field(a);
    e = e < emin ? emin : e;
    const float step = pow2i(e - mbits > 127 ? 127 : e - mbits);
    float r = nearbyintf(a / step) * step;
    r = r > max ? max : r;
    return copysignf(r, q);
}

/* One element quantized (mode 0) or, in its kernel (mode 1, |x / s| <= limit), zeroed; *zero says
 * whether it went to zero. */
static inline float quantize_one(float x, float s, const ks_term* k, int mode, float limit, int emin, int mbits,
                                 int is_int, int* zero) {
    const float safe = s == 0.0f ? 1.0f : s;
    if (mode == 1) {
        *zero = fabsf(x / safe) <= limit;
        return *zero ? 0.0f : x;
    }
    const float r = to_grid(x / safe, k->divisor, emin, mbits, is_int);
    *zero = r == 0.0f;
    return r * s;
}

/* n elements of a row with one scale s, or with a scale each (scales != NULL); returns the zeros. */
static int64_t quantize_span(const float* restrict x, int64_t n, float s, const float* restrict scales,
                             const ks_term* k, int mode, float limit, int emin, int mbits, int is_int,
                             float* restrict out) {
    int64_t zeros = 0;
    for (int64_t j = 0; j < n; j++) {
        int zero;
        out[j] = quantize_one(x[j], scales ? scales[j] : s, k, mode, limit, emin, mbits, is_int, &zero);
        zeros += zero;
    }
    return zeros;
}

static inline float nan_max(float a, float b) { return a != a || b != b ? NAN : (a > b ? a : b); }

int64_t ks_quantize_scratch(int64_t S, int64_t T, int64_t I, int threads) {
    return ((int64_t)(threads < 1 ? 1 : threads) * 3 * I + S * I + S + S * T) * 4 + 64;
}

/*
 * x (S, T, I) float32 or bfloat16 -> out, the same shape and type: every element quantized and
 * dequantized by the term's format (mode 0), or only its kernel |x / s| <= limit set to zero and every
 * other element kept (mode 1). The scale is formed from x itself, its maxima with NaN propagated (as
 * torch's are); a KS_SEP term reads its step factors rows (S, T) and cols (S, I). emin and mbits
 * describe the element grid (is_int: integer levels up to the term's divisor). zeros[0]: the elements
 * that went to zero. Returns 0.
 */
int ks_quantize(const void* x, int dtype, int64_t S, int64_t T, int64_t I, const ks_term* k, const float* rows,
                const float* cols, int mode, float limit, int emin, int mbits, int is_int, void* out,
                int64_t* zeros, int threads, void* scratch_) {
    if (threads < 1) threads = 1;
    float* scratch = scratch_;
    float* chan = scratch + (size_t)threads * 3 * (size_t)I; /* (S, I) channel maxima */
    float* seq = chan + (size_t)(S * I);                     /* (S,) sequence maxima */
    float* rowmax = seq + S;                                 /* (S, T) row maxima */
    const int64_t nrows = S * T;
    const int by_sequence = k->layout == KS_TENSOR || k->form == KS_NVFP4;
    if (by_sequence || k->layout == KS_CHANNEL) {
        #pragma omp parallel num_threads(threads)
        {
            float* in = scratch + (size_t)omp_get_thread_num() * 3 * (size_t)I;
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < nrows; g++) {
                const float* xr = (const float*)x + g * I;
                if (dtype != KS_F32) {
                    const uint16_t* b = (const uint16_t*)x + g * I;
                    for (int64_t j = 0; j < I; j++) in[j] = bitsf((uint32_t)b[j] << 16);
                    xr = in;
                }
                rowmax[g] = raw_max(xr, I);
            }
        }
        for (int64_t s = 0; s < S; s++) {
            float m = 0.0f;
            for (int64_t i = 0; i < T; i++) m = nan_max(m, rowmax[s * T + i]);
            seq[s] = m;
        }
        if (k->layout == KS_CHANNEL)
            for (int64_t s = 0; s < S; s++) {
                float* cm = chan + s * I;
                for (int64_t j = 0; j < I; j++) cm[j] = 0.0f;
                for (int64_t i = 0; i < T; i++)
                    for (int64_t j = 0; j < I; j++) {
                        const int64_t at = (s * T + i) * I + j;
                        const float v = dtype == KS_F32 ? ((const float*)x)[at]
                                                        : bitsf((uint32_t)((const uint16_t*)x)[at] << 16);
                        cm[j] = nan_max(cm[j], fabsf(v));
                    }
            }
    }
    int64_t total = 0;
    #pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        float* in = scratch + (size_t)omp_get_thread_num() * 3 * (size_t)I;
        float* res = in + I;
        float* sc = res + I;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < nrows; g++) {
            const int64_t s = g / T;
            const float* xr = (const float*)x + g * I;
            if (dtype != KS_F32) {
                const uint16_t* b = (const uint16_t*)x + g * I;
                for (int64_t j = 0; j < I; j++) in[j] = bitsf((uint32_t)b[j] << 16);
                xr = in;
            }
            float* o = dtype == KS_F32 ? (float*)out + g * I : res;
            if (k->layout == KS_TOKEN || k->layout == KS_TENSOR) {
                const float amax = k->layout == KS_TOKEN ? raw_max(xr, I) : seq[s];
                total += quantize_span(xr, I, unit_scale(k, amax, 0.0f), NULL, k, mode, limit, emin, mbits, is_int, o);
            } else if (k->layout == KS_BLOCK) {
                const float gseq = k->form == KS_NVFP4 ? seq[s] / k->tensor_divisor : 0.0f;
                for (int64_t start = 0; start < I; start += k->block) {
                    const int64_t len = I - start < k->block ? I - start : k->block;
                    const float bs = unit_scale(k, raw_max(xr + start, len), gseq);
                    total += quantize_span(xr + start, len, bs, NULL, k, mode, limit, emin, mbits, is_int, o + start);
                }
            } else { /* a scale per element: per channel, or the separable step */
                for (int64_t j = 0; j < I; j++) {
                    if (k->layout == KS_CHANNEL) {
                        sc[j] = unit_scale(k, chan[s * I + j], 0.0f);
                    } else {
                        const float step = rows[g] * cols[s * I + j] / k->divisor;
                        sc[j] = step < k->floor_ ? k->floor_ : step;
                    }
                }
                total += quantize_span(xr, I, 0.0f, sc, k, mode, limit, emin, mbits, is_int, o);
            }
            if (dtype != KS_F32) {
                uint16_t* ob = (uint16_t*)out + g * I;
                for (int64_t j = 0; j < I; j++) ob[j] = to_bf16(res[j]);
            }
        }
    }
    *zeros = total;
    return 0;
}
