/* Sinkhorn scalings for many small OT problems at once, one problem per SIMD lane.
 *
 * The plain-scaling iterations of glassmetric.similarity.sinkhorn._scaling_iterations
 * (Cuturi 2013; DIML, Zhao et al. ICCV 2021, eq. 5):
 *
 *     r = a / (E c),   c = b / (E^T r),   plan T = diag(r) E diag(c),   SS = sum_ij T_ij S_ij,
 *
 * with a per-problem stop: every `check_every` iterations the L1 row error
 * |r * (E c) - a|_1 of each problem is computed, and a problem whose error is <= tol keeps the
 * scalings of that check (the columns are exact after each c update). tol < 0: exactly
 * `max_iter` iterations. Denominators are clamped to the smallest normal float, so zero-mass
 * rows / columns get a scaling of exactly 0 and nothing is ever 0/0.
 *
 * Layout: a block holds LANES problems with the problem index innermost, E[i][j][lane], so
 * that every product of an iteration is a vector operation over the block with no horizontal
 * sums and no transposed copy, and one pass over E does a whole iteration (fused_pass). Each
 * block is gathered from the caller's strided tensors into buffers that stay in the caches
 * (16 x 16 register transposes), and its kernel is formed there.
 * Built by glassmetric/similarity/lane_sinkhorn.py at first use (gcc -O3 -march=native). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
/* the same vector type, read from caller memory that is only float-aligned */
typedef float vfu __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

static inline vf load(const float *p) { return *(const vfu *)p; }

typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vf at_least_tiny(vf d) {  /* max(d, smallest normal float), lane-wise */
    const vf tiny = (vf){0} + 1.17549435e-38f;
    const vi keep = d > tiny;
    return (vf)(((vi)d & keep) | ((vi)tiny & ~keep));
}

static inline vf clamp_unit(vf x) {  /* min(max(x, -1), 1), lane-wise */
    const vf one = (vf){0} + 1.0f;
    const vi hi = x > one, lo = x < -one;
    x = (vf)(((vi)x & ~hi) | ((vi)one & hi));
    return (vf)(((vi)x & ~lo) | ((vi)(-one) & lo));
}

static inline vf absolute(vf x) { return (vf)((vi)x & 0x7fffffff); }

/* E[i] . c over the m columns of row e, in 4 interleaved chains */
static inline vf row_dot(const float *restrict e, const vf *restrict c, int m) {
    vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int j = 0;
    for (; j + 4 <= m; j += 4) {
        s0 += load(e + (size_t)j * LANES) * c[j];
        s1 += load(e + (size_t)(j + 1) * LANES) * c[j + 1];
        s2 += load(e + (size_t)(j + 2) * LANES) * c[j + 2];
        s3 += load(e + (size_t)(j + 3) * LANES) * c[j + 3];
    }
    for (; j < m; j++) s0 += load(e + (size_t)j * LANES) * c[j];
    return (s0 + s1) + (s2 + s3);
}

/* One Sinkhorn iteration in ONE pass over E: for each row i, den_i = (E c)_i, the new
 * r_i = a_i / den_i, and at once cs += E[i] r_i (the column sums E^T r the c update needs),
 * while the rows are in L1; 4 rows at a time, so that their dot products, divisions and
 * updates of cs interleave. With `check`, also the L1 row error of the previous iteration's
 * plan, sum_i |r_prev_i den_i - a_i| (den = E c with the current c: its row sums). */
static void fused_pass(const float *restrict E, const vf *restrict c, const vf *restrict a,
                       const vf *restrict r_prev, vf *restrict r, vf *restrict cs, vf *err,
                       int n, int m, int check) {
    const size_t row = (size_t)m * LANES;
    for (int j = 0; j < m; j++) cs[j] = (vf){0};
    vf e_sum = {0};
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *e0 = E + (size_t)i * row, *e1 = e0 + row, *e2 = e1 + row, *e3 = e2 + row;
        vf d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};
        for (int j = 0; j < m; j++) {
            const vf cj = c[j];
            const size_t o = (size_t)j * LANES;
            d0 += load(e0 + o) * cj;
            d1 += load(e1 + o) * cj;
            d2 += load(e2 + o) * cj;
            d3 += load(e3 + o) * cj;
        }
        if (check)
            e_sum += (absolute(r_prev[i] * d0 - a[i]) + absolute(r_prev[i + 1] * d1 - a[i + 1])) +
                     (absolute(r_prev[i + 2] * d2 - a[i + 2]) + absolute(r_prev[i + 3] * d3 - a[i + 3]));
        const vf r0 = a[i] / at_least_tiny(d0), r1 = a[i + 1] / at_least_tiny(d1);
        const vf r2 = a[i + 2] / at_least_tiny(d2), r3 = a[i + 3] / at_least_tiny(d3);
        r[i] = r0; r[i + 1] = r1; r[i + 2] = r2; r[i + 3] = r3;
        for (int j = 0; j < m; j++) {
            const size_t o = (size_t)j * LANES;
            cs[j] += (load(e0 + o) * r0 + load(e1 + o) * r1) + (load(e2 + o) * r2 + load(e3 + o) * r3);
        }
    }
    for (; i < n; i++) {
        const float *e = E + (size_t)i * row;
        const vf den = row_dot(e, c, m);
        if (check) e_sum += absolute(r_prev[i] * den - a[i]);
        const vf ri = a[i] / at_least_tiny(den);
        r[i] = ri;
        for (int j = 0; j < m; j++) cs[j] += load(e + (size_t)j * LANES) * ri;
    }
    *err = e_sum;
}

/* two-source shuffle with constant indices, in GCC's and in clang's spelling */
#if defined(__clang__)
#define SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, (vi){__VA_ARGS__})
#endif
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
/* rows p and p + h: swap the off-diagonal h x h sub-blocks of their 2 x 2 block */
#define ROUND(h, LO, HI)                                    \
    for (int p = 0; p < LANES; p++) {                       \
        if (p & (h)) continue;                              \
        const vf x = r[p], y = r[p + (h)];                  \
        r[p] = SHUFFLE(x, y, LO);                           \
        r[p + (h)] = SHUFFLE(x, y, HI);                     \
    }

/* transposes the 16 x 16 floats r[row][lane] in place: 4 rounds that swap the off-diagonal
 * h x h sub-blocks (h = 8, 4, 2, 1), each 16 two-source shuffles */
static inline void transpose16(vf *r) {
    ROUND(8, LO8, HI8)
    ROUND(4, LO4, HI4)
    ROUND(2, LO2, HI2)
    ROUND(1, LO1, HI1)
}

/* 2^x for |x| <= 60, lane-wise: 2^round(x) (exponent bits) times a degree-7 Taylor
 * polynomial of 2^f on f in [-1/2, 1/2] (relative error 1e-7, float rounding included) */
static inline vf exp2_lanes(vf x) {
    const vi k = __builtin_convertvector(x + 64.5f, vi) - 64;  /* round(x), as x + 64.5 > 0 */
    const vf f = x - __builtin_convertvector(k, vf);
    vf p = f * 1.5252734e-05f + 0.00015403530f;
    p = p * f + 0.0013333558f;
    p = p * f + 0.0096181291f;
    p = p * f + 0.055504110f;
    p = p * f + 0.24022651f;
    p = p * f + 0.69314718f;
    p = p * f + 1.0f;
    vi bits;
    memcpy(&bits, &p, sizeof(bits));
    bits += k << 23;
    memcpy(&p, &bits, sizeof(p));
    return p;
}

/* Writes the plans T_ij = r_i E_ij c_j of the `live` problems of a block, each row-major at
 * out + lane * n * m; `tmp` (n * m vectors) is overwritten. Tiles of 16 cells are transposed
 * in registers from lane layout to problem layout. */
static void write_plans(const vf *restrict E, vf *restrict tmp, const vf *restrict r, const vf *restrict c,
                        float *out, size_t nv, size_t mv, int live) {
    const size_t cells = nv * mv;
    for (size_t i = 0; i < nv; i++)
        for (size_t j = 0; j < mv; j++) tmp[i * mv + j] = E[i * mv + j] * r[i] * c[j];
    size_t x0 = 0;
    for (; x0 + LANES <= cells; x0 += LANES) {
        vf t[LANES];
        for (int q = 0; q < LANES; q++) t[q] = tmp[x0 + q];
        transpose16(t);
        for (int l = 0; l < live; l++) *(vfu *)(out + (size_t)l * cells + x0) = t[l];
    }
    for (size_t x = x0; x < cells; x++)
        for (int l = 0; l < live; l++) out[(size_t)l * cells + x] = ((const float *)(tmp + x))[l];
}

/* Solves the blocks [begin, end) of the (G, K) problems, block = (g, LANES consecutive k).
 * S[g, k, i, j] at S + g*sg + k*sk + i*si + j*sj (any strides), mu[g, k, i] and nu[g, k, j]
 * likewise. The kernel is E = 2^(clamp(S, -1, 1) * scale), scale = log2(e) / epsilon (a
 * constant multiple of exp(-(1 - S) / epsilon), absorbed by the scalings). Lanes past K are
 * padded with trivial problems (E = 1, uniform marginals). Writes ss_out[g*K + k] and the
 * iteration whose scalings each problem kept, iters_out[g*K + k]. With plan_out not NULL,
 * also writes each plan T = diag(r) E diag(c) (float32, problem (g, k) at
 * plan_out + (g*K + k)*n*m, row-major), which is dSS/dS with the plan held constant. Returns
 * 0, or -1 if out of memory. */
int glassmetric_lane_sinkhorn(const float *S, int64_t sg, int64_t sk, int64_t si, int64_t sj,
                              const float *mu, int64_t ag, int64_t ak, int64_t ai,
                              const float *nu, int64_t bg, int64_t bk, int64_t bj,
                              int64_t K, int32_t n, int32_t m, float scale, int32_t max_iter,
                              int32_t check_every, float tol, int64_t begin, int64_t end,
                              float *ss_out, int32_t *iters_out, float *plan_out) {
    const size_t nv = (size_t)n, mv = (size_t)m, cells = nv * mv;
    const int64_t kb = (K + LANES - 1) / LANES;
    vf *buf = aligned_alloc(64, sizeof(vf) * (2 * cells + 4 * nv + 4 * mv));
    if (!buf) return -1;
    vf *E = buf, *Sl = E + cells;
    vf *a = Sl + cells, *r = a + nv, *r_prev = r + nv, *r_kept = r_prev + nv;
    vf *b = r_kept + nv, *c = b + mv, *cs = c + mv, *c_kept = cs + mv;
    float *e = (float *)E, *sl = (float *)Sl, *af = (float *)a, *bf = (float *)b;
    for (int64_t blk = begin; blk < end; blk++) {
        const int64_t g = blk / kb, k0 = (blk % kb) * LANES;
        const int live = K - k0 < LANES ? (int)(K - k0) : LANES;
        /* gather the block into lane layout (raw S, for SS): for each row i, tiles of 16
         * lanes x 16 columns are read as 16 vectors and transposed in registers */
        const float *src[LANES];
        for (int l = 0; l < LANES; l++) src[l] = S + g * sg + (k0 + l) * sk;
        for (size_t i = 0; i < nv; i++) {
            size_t j0 = 0;
            if (sj == 1) {
                for (; j0 + LANES <= mv; j0 += LANES) {
                    vf t[LANES];
                    for (int l = 0; l < LANES; l++)
                        t[l] = l < live ? load(src[l] + i * si + j0) : (vf){0};
                    transpose16(t);
                    for (int q = 0; q < LANES; q++) Sl[i * mv + j0 + q] = t[q];
                }
            }
            for (size_t j = j0; j < mv; j++)
                for (int l = 0; l < LANES; l++)
                    sl[(i * mv + j) * LANES + l] = l < live ? src[l][i * si + j * sj] : 0.0f;
        }
        for (int l = 0; l < LANES; l++) {
            const float *pa = mu + g * ag + (k0 + l) * ak, *pb = nu + g * bg + (k0 + l) * bk;
            for (size_t i = 0; i < nv; i++) af[i * LANES + l] = l < live ? pa[i * ai] : 1.0f / (float)n;
            for (size_t j = 0; j < mv; j++) bf[j * LANES + l] = l < live ? pb[j * bj] : 1.0f / (float)m;
        }
        for (size_t x = 0; x < cells; x++)  /* clamp: the cost 1 - S lies in [0, 2] */
            E[x] = exp2_lanes(clamp_unit(Sl[x]) * scale);
        int32_t *iters = iters_out + g * K + k0;
        int kept[LANES], n_kept = 0;
        for (int l = 0; l < LANES; l++) kept[l] = 0;
        /* c = 1 on live columns, 0 on zero-mass ones */
        for (size_t x = 0; x < mv * LANES; x++) ((float *)c)[x] = bf[x] > 0.0f ? 1.0f : 0.0f;
        for (int it = 1; it <= max_iter; it++) {
            /* the check of iteration it - 1 reads this pass's row sums (E c_{it-1}) */
            const int check = tol >= 0.0f && it - 1 >= check_every && (it - 1) % check_every == 0;
            vf *t = r_prev; r_prev = r; r = t;  /* r_prev: the scalings of iteration it - 1 */
            vf err;
            fused_pass(e, c, a, r_prev, r, cs, &err, n, m, check);
            if (check) {
                float ef[LANES];
                memcpy(ef, &err, sizeof(ef));
                for (int l = 0; l < LANES; l++) {
                    if (kept[l] || !(ef[l] <= tol)) continue;
                    kept[l] = 1;
                    n_kept++;
                    if (l < live) iters[l] = it - 1;
                    for (size_t i = 0; i < nv; i++) ((float *)(r_kept + i))[l] = ((float *)(r_prev + i))[l];
                    for (size_t j = 0; j < mv; j++) ((float *)(c_kept + j))[l] = ((float *)(c + j))[l];
                }
                if (n_kept == LANES) break;
            }
            for (size_t j = 0; j < mv; j++) c[j] = b[j] / at_least_tiny(cs[j]);
        }
        for (int l = 0; l < LANES; l++) {  /* not converged (or no tol): the last scalings */
            if (kept[l]) continue;
            if (l < live) iters[l] = max_iter;
            for (size_t i = 0; i < nv; i++) ((float *)(r_kept + i))[l] = ((float *)(r + i))[l];
            for (size_t j = 0; j < mv; j++) ((float *)(c_kept + j))[l] = ((float *)(c + j))[l];
        }
        /* SS = sum_i r_i sum_j (E_ij S_ij) c_j */
        vf total = {0};
        for (size_t i = 0; i < nv; i++) {
            vf acc = {0};
            for (size_t j = 0; j < mv; j++) acc += E[i * mv + j] * Sl[i * mv + j] * c_kept[j];
            total += acc * r_kept[i];
        }
        float out[LANES];
        memcpy(out, &total, sizeof(out));
        for (int l = 0; l < live; l++) ss_out[g * K + k0 + l] = out[l];
        if (plan_out) write_plans(E, Sl, r_kept, c_kept, plan_out + (g * K + k0) * (int64_t)cells, nv, mv, live);
    }
    free(buf);
    return 0;
}
