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
 * sums and no transposed copy. Each block is gathered from the caller's strided tensors
 * into a buffer that stays in the caches, and its kernel is formed there.
 * Built by glassmetric/similarity/lane_sinkhorn.py at first use (gcc -O3 -march=native). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
/* the same vector type, read from caller memory that is only float-aligned */
typedef float vfu __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

static inline vf load(const float *p) { return *(const vfu *)p; }

/* den[i] = sum_j E[i][j] * c[j]: 4 rows at a time, so 4 accumulation chains interleave */
static void row_dot(const float *restrict E, const vf *restrict c, vf *restrict den, int n, int m) {
    const size_t row = (size_t)m * LANES;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *e = E + (size_t)i * row;
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int j = 0; j < m; j++) {
            const vf cj = c[j];
            const size_t o = (size_t)j * LANES;
            s0 += load(e + o) * cj;
            s1 += load(e + row + o) * cj;
            s2 += load(e + 2 * row + o) * cj;
            s3 += load(e + 3 * row + o) * cj;
        }
        den[i] = s0; den[i + 1] = s1; den[i + 2] = s2; den[i + 3] = s3;
    }
    for (; i < n; i++) {
        const float *e = E + (size_t)i * row;
        vf s = {0};
        for (int j = 0; j < m; j++) s += load(e + (size_t)j * LANES) * c[j];
        den[i] = s;
    }
}

/* cs[j] = sum_i E[i][j] * r[i]: 8 columns at a time */
static void col_dot(const float *restrict E, const vf *restrict r, vf *restrict cs, int n, int m) {
    const size_t row = (size_t)m * LANES;
    int j = 0;
    for (; j + 8 <= m; j += 8) {
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
        for (int i = 0; i < n; i++) {
            const float *e = E + (size_t)i * row + (size_t)j * LANES;
            const vf ri = r[i];
            s0 += load(e) * ri;
            s1 += load(e + LANES) * ri;
            s2 += load(e + 2 * LANES) * ri;
            s3 += load(e + 3 * LANES) * ri;
            s4 += load(e + 4 * LANES) * ri;
            s5 += load(e + 5 * LANES) * ri;
            s6 += load(e + 6 * LANES) * ri;
            s7 += load(e + 7 * LANES) * ri;
        }
        cs[j] = s0; cs[j + 1] = s1; cs[j + 2] = s2; cs[j + 3] = s3;
        cs[j + 4] = s4; cs[j + 5] = s5; cs[j + 6] = s6; cs[j + 7] = s7;
    }
    for (; j < m; j++) {
        vf s = {0};
        for (int i = 0; i < n; i++) s += load(E + (size_t)i * row + (size_t)j * LANES) * r[i];
        cs[j] = s;
    }
}

/* out = num / max(den, tiny), lane-wise (vectorised by the compiler) */
static void divide(const float *restrict num, const vf *restrict den, vf *restrict out, int rows) {
    const float tiny = 1.17549435e-38f;
    const float *d = (const float *)den;
    float *o = (float *)out;
    for (int x = 0; x < rows * LANES; x++) o[x] = num[x] / (d[x] > tiny ? d[x] : tiny);
}

/* 2^x for |x| <= 60, lane-wise: 2^round(x) (exponent bits) times a degree-7 Taylor
 * polynomial of 2^f on f in [-1/2, 1/2] (relative error 1e-7, float rounding included) */
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
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

/* Solves the blocks [begin, end) of the (G, K) problems, block = (g, LANES consecutive k).
 * S[g, k, i, j] at S + g*sg + k*sk + i*si + j*sj (any strides), mu[g, k, i] and nu[g, k, j]
 * likewise. The kernel is E = 2^(clamp(S, -1, 1) * scale), scale = log2(e) / epsilon (a
 * constant multiple of exp(-(1 - S) / epsilon), absorbed by the scalings). Lanes past K are
 * padded with trivial problems (E = 1, uniform marginals). Writes ss_out[g*K + k] and the
 * iteration whose scalings each problem kept, iters_out[g*K + k]. Returns 0, or -1 if out of
 * memory. */
int glassmetric_lane_sinkhorn(const float *S, int64_t sg, int64_t sk, int64_t si, int64_t sj,
                              const float *mu, int64_t ag, int64_t ak, int64_t ai,
                              const float *nu, int64_t bg, int64_t bk, int64_t bj,
                              int64_t K, int32_t n, int32_t m, float scale, int32_t max_iter,
                              int32_t check_every, float tol, int64_t begin, int64_t end,
                              float *ss_out, int32_t *iters_out) {
    const size_t nv = (size_t)n, mv = (size_t)m, cells = nv * mv;
    const int64_t kb = (K + LANES - 1) / LANES;
    vf *buf = aligned_alloc(64, sizeof(vf) * (2 * cells + 4 * nv + 4 * mv));
    if (!buf) return -1;
    vf *E = buf, *Sl = E + cells;
    vf *a = Sl + cells, *r = a + nv, *den = r + nv, *r_kept = den + nv;
    vf *b = r_kept + nv, *c = b + mv, *cs = c + mv, *c_kept = cs + mv;
    float *e = (float *)E, *sl = (float *)Sl, *af = (float *)a, *bf = (float *)b;
    for (int64_t blk = begin; blk < end; blk++) {
        const int64_t g = blk / kb, k0 = (blk % kb) * LANES;
        const int live = K - k0 < LANES ? (int)(K - k0) : LANES;
        /* gather the block: S into lane layout (raw, for SS) and its kernel */
        for (int l = 0; l < LANES; l++) {
            const float *src = S + g * sg + (k0 + l) * sk;
            const float *pa = mu + g * ag + (k0 + l) * ak, *pb = nu + g * bg + (k0 + l) * bk;
            for (size_t i = 0; i < nv; i++) {
                for (size_t j = 0; j < mv; j++)
                    sl[(i * mv + j) * LANES + l] = l < live ? src[i * si + j * sj] : 0.0f;
                af[i * LANES + l] = l < live ? pa[i * ai] : 1.0f / (float)n;
            }
            for (size_t j = 0; j < mv; j++) bf[j * LANES + l] = l < live ? pb[j * bj] : 1.0f / (float)m;
        }
        for (size_t x = 0; x < cells * LANES; x++) {  /* clamp: the cost 1 - S is in [0, 2] */
            const float v = sl[x] < -1.0f ? -1.0f : (sl[x] > 1.0f ? 1.0f : sl[x]);
            e[x] = v * scale;
        }
        for (size_t x = 0; x < cells; x++) E[x] = exp2_lanes(E[x]);
        int32_t *iters = iters_out + g * K + k0;
        int kept[LANES], n_kept = 0;
        for (int l = 0; l < LANES; l++) kept[l] = 0;
        /* c = 1 on live columns, 0 on zero-mass ones */
        for (size_t x = 0; x < mv * LANES; x++) ((float *)c)[x] = bf[x] > 0.0f ? 1.0f : 0.0f;
        for (int it = 1; it <= max_iter; it++) {
            row_dot(e, c, den, n, m);
            divide(af, den, r, n);
            col_dot(e, r, cs, n, m);
            divide(bf, cs, c, m);
            if (tol < 0.0f || it % check_every != 0 || it >= max_iter) continue;
            row_dot(e, c, den, n, m);
            float err[LANES];
            for (int l = 0; l < LANES; l++) err[l] = 0.0f;
            for (size_t i = 0; i < nv; i++) {
                const float *ri = (const float *)(r + i), *di = (const float *)(den + i);
                const float *ai_ = af + i * LANES;
                for (int l = 0; l < LANES; l++) {
                    const float d = ri[l] * di[l] - ai_[l];
                    err[l] += d < 0.0f ? -d : d;
                }
            }
            for (int l = 0; l < LANES; l++) {
                if (kept[l] || !(err[l] <= tol)) continue;
                kept[l] = 1;
                n_kept++;
                if (l < live) iters[l] = it;
                for (size_t i = 0; i < nv; i++) ((float *)(r_kept + i))[l] = ((float *)(r + i))[l];
                for (size_t j = 0; j < mv; j++) ((float *)(c_kept + j))[l] = ((float *)(c + j))[l];
            }
            if (n_kept == LANES) break;
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
    }
    free(buf);
    return 0;
}
