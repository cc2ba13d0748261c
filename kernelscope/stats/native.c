/*
 * The two per-element passes of a profile, for CPU (see elementwise.py, which defines what they
 * compute and holds the equivalent torch code used everywhere else).
 *
 *   ks_ranges: t_i = max_j |x_ij| and c_j = max_i |x_ij| per sequence, NaN and ±Inf measured as 0,
 *              in one reading of x.
 *   ks_count:  for several step definitions at once, the elements with |x| <= 0.5·Δ (the kernel),
 *              the positions whose step is below the per-token step, and the non-finite elements,
 *              in one more reading of x.
 *
 * Built with -ffp-contract=off and without -ffast-math: every float operation here is one IEEE
 * operation in the same order as the torch code (a multiply, a divide, a comparison), so the counts
 * equal torch's to the last element. Maxima are taken on the bit patterns of |x|: a non-negative
 * float's bits order like the float, and integer maxima vectorise where float ones may not.
 * Rows are shared among OpenMP threads; each thread keeps its own channel maxima and counts.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define KS_MAX_TERMS 64
#define ABS_MASK 0x7fffffffu
#define INF_BITS 0x7f800000u

enum { KS_F32 = 0, KS_BF16 = 1 };        /* element type of x */
/* step given per token, given per channel, row·col/qmax, or the per-token step max(t/qmax, floor) */
enum { KS_ROW = 0, KS_COL = 1, KS_SEP = 2, KS_TOKEN = 3 };

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

/* Bytes of scratch space ks_ranges and ks_count need. The caller provides it, so that nothing here
 * allocates while a model's activations come and go. */
int64_t ks_ranges_scratch(int64_t I, int threads) { return (int64_t)(threads < 1 ? 1 : threads) * I * 2 * 4; }

int64_t ks_count_scratch(int dtype, int64_t S, int64_t I, int ncol, int nsep, int threads) {
    return ((dtype == KS_F32 ? 0 : (int64_t)(threads < 1 ? 1 : threads) * I) + (int64_t)ncol * S * I
            + (int64_t)nsep * S + 1) * 4;
}

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

/* Kernel bounds 0.5·Δ are compared as floats: a NaN element fails every comparison; an infinite one
 * fails too, because a bound that overflowed to +Inf is lowered to the largest finite float (which
 * still admits every finite element). */
static inline float capped(float bound) { return bound > FLT_MAX ? FLT_MAX : bound; }

/* In one reading of a row: its finite elements, and those with |x| <= bound0 and <= bound1 (a bound
 * of -1 admits nothing, for a single bound). */
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

static int32_t kernel_col(const float* restrict x, const float* restrict bound, int64_t n) {
    int32_t k = 0;
    for (int64_t j = 0; j < n; j++) k += fabsf(x[j]) <= bound[j];
    return k;
}

static int32_t below_col(const float* restrict step, int64_t n, float per_token) {
    int32_t k = 0;
    for (int64_t j = 0; j < n; j++) k += step[j] < per_token;
    return k;
}

/* The per-token step of a token with maximum t. */
static inline float token_step(float t, float qmax, float floor_) {
    const float step = t / qmax;
    return step < floor_ ? floor_ : step;
}

/* Separable step: max(row · col / qmax, floor), as kernelscope.quant.separable_step evaluates it.
 * Without a per-token step, `below` is counted against p = -Inf: nothing is below it. This form caps
 * a bound that overflowed; the caller uses it for rows where row · col can reach +Inf. */
static void kernel_sep(const float* restrict x, const float* restrict col, int64_t n, float row, float qmax,
                       float floor_, float p, int32_t* kernel, int32_t* below) {
    int32_t k = 0, b = 0;
    for (int64_t j = 0; j < n; j++) {
        float step = row * col[j] / qmax;
        step = step < floor_ ? floor_ : step;
        k += fabsf(x[j]) <= capped(0.5f * step);
        b += step < p;
    }
    *kernel = k;
    *below = b;
}

/*
 * The same counts for rows where row · col stays finite, for two terms sharing their factors (one
 * quantizer at two widths: the product is formed once; a lone term passes itself twice, which costs
 * no measurable time). Half-steps are compared directly:
 * 0.5 · max(p / q, floor) equals max(p / (2q), 0.5 · floor) bit for bit, since halving commutes with
 * rounding wherever the result can exceed 0.5 · floor, and below that both sides are 0.5 · floor. A
 * finite bound needs no cap, and an infinite |x| fails every comparison with it. h = 2q and hp the
 * half per-token step (-Inf: no below count).
 */
static void kernel_sep_half2(const float* restrict x, const float* restrict col, int64_t n, float row,
                             float h0, float h1, float half_floor, float hp0, float hp1, int32_t* out) {
    int32_t k0 = 0, k1 = 0, b0 = 0, b1 = 0;
    for (int64_t j = 0; j < n; j++) {
        const float product = row * col[j];
        float half0 = product / h0, half1 = product / h1;
        half0 = half0 < half_floor ? half_floor : half0;
        half1 = half1 < half_floor ? half_floor : half1;
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

/*
 * x (S, T, I) row-major, t (S, T) its token maxima. Term k has kind[k]:
 *   KS_ROW:   step a[k] (S, T)
 *   KS_COL:   step a[k] (S, I)
 *   KS_SEP:   row a[k] (S, T), col b[k] (S, I), qmax q[k]: step max(row·col/qmax, floor)
 *   KS_TOKEN: step max(t/q[k], floor), as kernelscope.quant.per_token_step evaluates it
 * With pq[k] > 0, below[k] counts the positions whose step is below the per-token step
 * max(t/pq[k], floor); otherwise it is 0. Writes kernel[k], below[k] and nonfinite[0], using
 * ks_count_scratch bytes of scratch. Returns 0, or 2 with too many terms.
 */
int ks_count(const void* x, int dtype, int64_t S, int64_t T, int64_t I, const float* t, int nterms,
             const int32_t* kind, const float* const* a, const float* const* b, const float* q, const float* pq,
             float floor_, int64_t* kernel, int64_t* below, int64_t* nonfinite, int threads, void* scratch_) {
    if (nterms > KS_MAX_TERMS) return 2;
    if (threads < 1) threads = 1;
    int ncol = 0;
    for (int k = 0; k < nterms; k++) ncol += kind[k] == KS_COL;
    /* Scratch: per thread a row of float32 (bfloat16 input only); the column bounds of the KS_COL
     * terms; per KS_SEP term and sequence the largest column factor. */
    const size_t row_floats = dtype == KS_F32 ? 0 : (size_t)I;
    float* scratch = scratch_;
    float* colbound = scratch + (size_t)threads * row_floats;
    float* colmax = colbound + (size_t)ncol * (size_t)(S * I);
    const float* bounds[KS_MAX_TERMS] = {0};
    const float* sepmax[KS_MAX_TERMS] = {0};
    int partner[KS_MAX_TERMS]; /* the next term with the same factors, -1 none, -2 counted by another */
    for (int k = 0; k < nterms; k++) partner[k] = -1;
    for (int k = 0; k < nterms; k++) {
        if (kind[k] == KS_COL) {
            float* cb = colbound;
            colbound += S * I;
            for (int64_t j = 0; j < S * I; j++) cb[j] = capped(0.5f * a[k][j]);
            bounds[k] = cb;
        } else if (kind[k] == KS_SEP) {
            float* cm = colmax;
            colmax += S;
            for (int64_t s = 0; s < S; s++) {
                float m = 0.0f;
                for (int64_t j = 0; j < I; j++) m = b[k][s * I + j] > m ? b[k][s * I + j] : m;
                cm[s] = m;
            }
            sepmax[k] = cm;
            if (partner[k] == -1)
                for (int k2 = k + 1; k2 < nterms; k2++)
                    if (kind[k2] == KS_SEP && partner[k2] == -1 && a[k2] == a[k] && b[k2] == b[k]) {
                        partner[k] = k2;
                        partner[k2] = -2;
                        break;
                    }
        }
    }
    const float half_floor = 0.5f * floor_;
    for (int k = 0; k < nterms; k++) kernel[k] = below[k] = 0;
    *nonfinite = 0;
    const int64_t rows = S * T;
    #pragma omp parallel num_threads(threads)
    {
        float* buf = scratch + (size_t)omp_get_thread_num() * row_floats;
        int64_t kern[KS_MAX_TERMS] = {0}, bel[KS_MAX_TERMS] = {0}, bad = 0;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < rows; g++) {
            const int64_t s = g / T;
            const float* xr = (const float*)x + g * I;
            if (dtype != KS_F32) {
                bf16_abs_bits((const uint16_t*)x + g * I, (uint32_t*)buf, I);
                xr = buf;
            }
            /* Per-row steps first (their kernels are counted two at a time with the non-finite
             * elements), then per-channel and separable ones. */
            float p[KS_MAX_TERMS], rowbound[KS_MAX_TERMS + 1];
            int rowterm[KS_MAX_TERMS + 1], nrow = 0;
            for (int k = 0; k < nterms; k++) {
                p[k] = pq[k] > 0.0f ? token_step(t[g], pq[k], floor_) : -INFINITY;
                if (kind[k] == KS_ROW || kind[k] == KS_TOKEN) {
                    const float step = kind[k] == KS_ROW ? a[k][g] : token_step(t[g], q[k], floor_);
                    if (step < p[k]) bel[k] += I;
                    rowterm[nrow] = k;
                    rowbound[nrow++] = capped(0.5f * step);
                }
            }
            rowterm[nrow] = -1;
            rowbound[nrow] = -1.0f;
            for (int r = 0; r < (nrow > 0 ? nrow : 1); r += 2) {
                int32_t finite, k0, k1;
                row_counts(xr, I, rowbound[r], rowbound[r + 1], &finite, &k0, &k1);
                if (r == 0) bad += I - finite;
                if (rowterm[r] >= 0) kern[rowterm[r]] += k0;
                if (r + 1 < nrow) kern[rowterm[r + 1]] += k1;
            }
            for (int k = 0; k < nterms; k++) {
                if (kind[k] == KS_COL) {
                    kern[k] += kernel_col(xr, bounds[k] + s * I, I);
                    if (pq[k] > 0.0f) bel[k] += below_col(a[k] + s * I, I, p[k]);
                } else if (kind[k] == KS_SEP && partner[k] != -2) {
                    const float row = a[k][g], *col = b[k] + s * I;
                    const int k2 = partner[k];
                    int32_t c[4];
                    if (!(row * sepmax[k][s] < INFINITY)) { /* fl(row · col) is monotone in col */
                        kernel_sep(xr, col, I, row, q[k], floor_, p[k], &c[0], &c[2]);
                        if (k2 >= 0) kernel_sep(xr, col, I, row, q[k2], floor_, p[k2], &c[1], &c[3]);
                    } else {
                        const int other = k2 >= 0 ? k2 : k;
                        kernel_sep_half2(xr, col, I, row, 2.0f * q[k], 2.0f * q[other], half_floor, 0.5f * p[k],
                                         0.5f * p[other], c);
                    }
                    kern[k] += c[0];
                    bel[k] += c[2];
                    if (k2 >= 0) {
                        kern[k2] += c[1];
                        bel[k2] += c[3];
                    }
                }
            }
        }
        #pragma omp critical
        {
            for (int k = 0; k < nterms; k++) {
                kernel[k] += kern[k];
                below[k] += bel[k];
            }
            *nonfinite += bad;
        }
    }
    return 0;
}
