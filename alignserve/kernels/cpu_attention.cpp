// Attention over a bf16 KV pool on the CPU: every query of one decode step, or of one prompt's
// prefill (causal jobs), in one call per layer.
//
// A step's attention is a set of jobs: each job is some query rows and the key slots they all
// read (a shared prompt segment and the rows of its group, one row's own leaf, or a block of a
// prompt's rows over the prompt up to them, causally). Each job is
// split into work items (KV head x up to 64 query lanes x a chunk of its keys) that run in
// parallel and leave a partial softmax (max, sum, unnormalised output) per lane; a second pass
// merges, for every row and head, the partials of all the jobs that hold the row (Hydragen's
// exact log-sum-exp merge). A shared segment's keys are thus read once for its whole group.
//
// Inside an item the lanes are the G query heads of the KV head for each of the job's rows,
// 16 to a vector: a key's scores for all lanes are one broadcast-FMA chain over the head
// dimension, with no horizontal sums, and the softmax runs on vectors of lanes per 16 keys
// (items of few lanes take keys as rows instead: run_item_few). Written with GCC vector
// extensions, compiled at first use with -march=native for the machine it runs on
// (cpu_build.py); sums accumulate in fp32, and with AVX512-BF16 the products take bf16 queries
// and weights (dot2 below).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static const int LANES = 16;
static const int MAX_TILES = 4;  // lanes per item: 64 (a group of 21 rows with G = 3)
static const int KB = 16;        // keys per softmax block
static const int FEW_LANES = 8;  // items of at most this many lanes take run_item_few
static const float NEG = -1e30f; // "no keys yet": finite, so that differences stay finite

static inline v16 splat(float x) { return v16{} + x; }

static inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

static inline v16 load_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    return (v16)(__builtin_convertvector(h, v16u) << 16);
}

// exp(x) for x <= 0 (scores minus their running max): 2^n * 2^f with a degree-6 polynomial
// for 2^f, |f| <= 1/2 (relative error ~2e-7, below fp32's rounding of the scores themselves).
static inline v16 vexp(v16 x) {
    x = vmax(x, splat(-87.0f));
    v16 t = x * 1.44269504088896341f;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    v16 n = (t + magic) - magic;
    v16 f = (t - n) * 0.693147180559945f;
    v16 p = splat(1.0f / 720);
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16)e;
}

#ifdef __AVX512BF16__
// bf16 of x, rounded to nearest even (what the pool holds, and what bf16 dot products take).
static inline uint32_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u + 0x7fff + ((u >> 16) & 1)) >> 16;
}

// Where the CPU has bf16 dot products (AVX512-BF16), the scores multiply bf16 queries by the
// pool's bf16 keys as they lie, two dimensions per instruction, accumulating in fp32: half the
// instructions of converting the keys and using fp32 FMAs. The queries round to bf16, as in
// torch's fused op over a bf16 pool.
typedef uint32_t v16p __attribute__((vector_size(64)));  // 16 pairs of bf16
static inline v16 dot2(v16 acc, v16p a, v16p b) {
    return (v16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}
// 16 floats rounded to bf16 (nearest even), each in the low half of its 32 bits.
static inline v16p to_bf16v(v16 x) {
    v16p u = (v16p)x;
    return (u + 0x7fff + ((u >> 16) & 1)) >> 16;
}
// Value rows a and b (16 dimensions of each, bf16) as pairs: element i = (a[i], b[i]), so one
// bf16 dot product adds two keys' weighted values (the weights paired alike).
static inline v16p value_pair(const uint16_t *a, const uint16_t *b) {
    v16h x, y;
    memcpy(&x, a, sizeof x);
    if (b) memcpy(&y, b, sizeof y); else y = v16h{};
    return __builtin_convertvector(x, v16p) | __builtin_convertvector(y, v16p) << 16;
}
#endif

static inline float hmax(v16 a) {
    float m = a[0];
    for (int i = 1; i < LANES; i++) m = a[i] > m ? a[i] : m;
    return m;
}

struct Job {
    const int32_t *rows;  // query rows
    int n_rows;
    const int32_t *lo, *hi;  // key slot ranges [lo, hi)
    int n_ranges;
    int64_t keys;
    // Causal (a prompt's rows over itself): the last n_rows keys are the rows' own tokens, in
    // order, and row i sees keys up to diag0 + i (diag0 = keys - n_rows).
    bool causal;
    int64_t diag0;
};

struct Item {
    int job, head, lane0, lanes;
    int64_t key0, key1;  // the chunk: the job's keys [key0, key1) in range order
    int64_t partial;     // offset of this item's partials (floats)
};

struct Shape {
    const float *q;
    int64_t q_stride;  // floats between query rows
    const uint16_t *k, *v;
    int64_t slot_stride;  // elements between slots of the pools
    int H, KVH, G;
    float scale;
};

// Walks a job's keys [key0, key1) (in range order) a block of up to KB slots at a time.
struct KeyCursor {
    const Job &job;
    int r = 0;
    int64_t slot = 0, remaining;
    KeyCursor(const Job &j, int64_t key0, int64_t key1) : job(j), remaining(key1 - key0) {
        int64_t skip = key0;
        while (r < job.n_ranges && skip >= job.hi[r] - job.lo[r]) skip -= job.hi[r] - job.lo[r], r++;
        slot = r < job.n_ranges ? job.lo[r] + skip : 0;
    }
    int next(int64_t *slots) {  // the block's slots; returns how many (0: done)
        int nb = 0;
        while (nb < KB && remaining > 0) {
            while (slot >= job.hi[r]) slot = job.lo[++r];
            slots[nb++] = slot++;
            remaining--;
        }
        return nb;
    }
};

// The weighted values of a block into the lanes' outputs, LB lanes at a time so that each value
// vector loaded feeds LB lanes: acc[L] = acc[L] * alpha[L] + sum over steps j of add(., j, c, L).
template <int ND, int LB, class Add>
static inline void accumulate(v16 (*acc)[ND], const float *alpha, int lanes, int steps, Add add) {
    for (int L0 = 0; L0 < lanes; L0 += LB) {
        const int nl = lanes - L0 < LB ? lanes - L0 : LB;
        v16 o[LB][ND];
        for (int u = 0; u < LB; u++)
            for (int c = 0; c < ND; c++)
                o[u][c] = u < nl ? acc[L0 + u][c] * alpha[L0 + u] : splat(0.0f);
        for (int j = 0; j < steps; j++)
            for (int c = 0; c < ND; c++)
                for (int u = 0; u < LB; u++) o[u][c] = add(o[u][c], j, c, u < nl ? L0 + u : L0);
        for (int u = 0; u < nl; u++) memcpy(acc[L0 + u], o[u], sizeof o[u]);
    }
}

// One work item: lanes [lane0, lane0 + lanes) of a job's KV head `head` over keys [key0, key1).
// Partials per lane: [m, l, acc[D]].
template <int ND, int NT>
static void run_item(const Shape &s, const Job &job, const Item &it, float *partials) {
    const int D = ND * LANES;
    v16 qt[D][NT];  // scaled queries, transposed: qt[d][tile] holds dimension d of 16 lanes
    memset(qt, 0, sizeof qt);
    for (int L = 0; L < it.lanes; L++) {
        int lane = it.lane0 + L;
        const float *src = s.q + job.rows[lane / s.G] * s.q_stride
                           + (int64_t)(it.head * s.G + lane % s.G) * D;
        for (int d = 0; d < D; d++) qt[d][L / LANES][L % LANES] = src[d] * s.scale;
    }
#ifdef __AVX512BF16__
    v16p qp[D / 2][NT];  // the same, as bf16 pairs of dimensions (2i, 2i + 1)
    for (int d = 0; d < D; d += 2)
        for (int t = 0; t < NT; t++)
            for (int i = 0; i < LANES; i++)
                qp[d / 2][t][i] = to_bf16(qt[d][t][i]) | to_bf16(qt[d + 1][t][i]) << 16;
#endif
    v16 m[NT], l[NT];
    for (int t = 0; t < NT; t++) m[t] = splat(NEG), l[t] = splat(0.0f);
    static thread_local v16 acc[MAX_TILES * LANES][ND];  // unnormalised outputs per lane
    memset(acc, 0, sizeof(v16) * ND * it.lanes);

    KeyCursor keys(job, it.key0, it.key1);
    const int64_t head_off = (int64_t)it.head * D;
    v16i row_of[NT];  // each lane's row within the job (causal masks)
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < LANES; i++) {
            int L = t * LANES + i;
            row_of[t][i] = L < it.lanes ? (it.lane0 + L) / s.G : 1 << 30;
        }
    int64_t kbase = it.key0;  // the job's index of the block's first key

    int64_t slots[KB];
    for (int nb; (nb = keys.next(slots)) > 0;) {
        const bool masked = job.causal && kbase + nb - 1 > job.diag0 + it.lane0 / s.G;
        const int first = (int)(kbase - job.diag0);  // row that first sees the block's key 0
        kbase += nb;
        v16 sc[KB][NT];
        // Four keys at a time: each query vector loaded once feeds four FMA chains (one per
        // key), so loads stay below the FMAs and the chains hide their latency.
        for (int j0 = 0; j0 < nb; j0 += 4) {
            v16 a0[NT], a1[NT], a2[NT], a3[NT];
            for (int t = 0; t < NT; t++) a0[t] = a1[t] = a2[t] = a3[t] = splat(0.0f);
#ifdef __AVX512BF16__
            const uint32_t *kp[4];
            for (int u = 0; u < 4; u++)
                kp[u] = (const uint32_t *)(s.k + slots[j0 + u < nb ? j0 + u : j0] * s.slot_stride
                                           + head_off);
            for (int d = 0; d < D / 2; d++)
                for (int t = 0; t < NT; t++) {
                    v16p qd = qp[d][t];
                    a0[t] = dot2(a0[t], qd, v16p{} + kp[0][d]);
                    a1[t] = dot2(a1[t], qd, v16p{} + kp[1][d]);
                    a2[t] = dot2(a2[t], qd, v16p{} + kp[2][d]);
                    a3[t] = dot2(a3[t], qd, v16p{} + kp[3][d]);
                }
#else
            float kf[4][D] __attribute__((aligned(64)));
            for (int u = 0; u < 4; u++) {
                const uint16_t *kp = s.k + slots[j0 + u < nb ? j0 + u : j0] * s.slot_stride + head_off;
                for (int c = 0; c < ND; c++) {
                    v16 x = load_bf16(kp + c * LANES);
                    memcpy(&kf[u][c * LANES], &x, sizeof x);
                }
            }
            for (int d = 0; d < D; d++)
                for (int t = 0; t < NT; t++) {
                    v16 qd = qt[d][t];
                    a0[t] += kf[0][d] * qd;
                    a1[t] += kf[1][d] * qd;
                    a2[t] += kf[2][d] * qd;
                    a3[t] += kf[3][d] * qd;
                }
#endif
            for (int t = 0; t < NT; t++) {
                sc[j0][t] = a0[t];
                if (j0 + 1 < nb) sc[j0 + 1][t] = a1[t];
                if (j0 + 2 < nb) sc[j0 + 2][t] = a2[t];
                if (j0 + 3 < nb) sc[j0 + 3][t] = a3[t];
            }
        }
        if (masked)
            for (int j = 0; j < nb; j++)
                for (int t = 0; t < NT; t++) sc[j][t] = row_of[t] >= first + j ? sc[j][t] : splat(NEG);
        float alpha[NT * LANES] __attribute__((aligned(64)));
        float p[KB][NT * LANES] __attribute__((aligned(64)));
        for (int t = 0; t < NT; t++) {
            v16 mb = sc[0][t];
            for (int j = 1; j < nb; j++) mb = vmax(mb, sc[j][t]);
            v16 mn = vmax(m[t], mb);
            v16 al = vexp(m[t] - mn);
            v16 sum = splat(0.0f);
            for (int j = 0; j < nb; j++) {
                v16 pj = vexp(sc[j][t] - mn);
                if (masked) pj = row_of[t] >= first + j ? pj : splat(0.0f);
                sum += pj;
                memcpy(&p[j][t * LANES], &pj, sizeof pj);
            }
            l[t] = l[t] * al + sum;
            m[t] = mn;
            memcpy(&alpha[t * LANES], &al, sizeof al);
        }
        // Lanes a few at a time: each value row loaded once feeds LB lanes' FMAs.
        const int LB = ND <= 4 ? 4 : 2;
#ifdef __AVX512BF16__
        // Weighted values by bf16 dot products over pairs of keys: the weights round to bf16
        // (as torch's fused op's do over a bf16 pool), the sums stay fp32.
        const int np = (nb + 1) / 2;
        v16p vp2[KB / 2][ND];
        uint32_t pp[KB / 2][NT * LANES] __attribute__((aligned(64)));
        for (int jp = 0; jp < np; jp++) {
            const uint16_t *va = s.v + slots[2 * jp] * s.slot_stride + head_off;
            const uint16_t *vb = 2 * jp + 1 < nb ? s.v + slots[2 * jp + 1] * s.slot_stride + head_off
                                                 : nullptr;
            for (int c = 0; c < ND; c++) vp2[jp][c] = value_pair(va + c * LANES, vb ? vb + c * LANES : nullptr);
            for (int t = 0; t < NT; t++) {
                v16 pa, pb = splat(0.0f);
                memcpy(&pa, &p[2 * jp][t * LANES], sizeof pa);
                if (2 * jp + 1 < nb) memcpy(&pb, &p[2 * jp + 1][t * LANES], sizeof pb);
                v16p pair = to_bf16v(pa) | to_bf16v(pb) << 16;
                memcpy(&pp[jp][t * LANES], &pair, sizeof pair);
            }
        }
        accumulate<ND, LB>(acc, alpha, it.lanes, np, [&](v16 o, int jp, int c, int L) {
            return dot2(o, vp2[jp][c], v16p{} + pp[jp][L]);
        });
#else
        v16 vf[KB][ND];
        for (int j = 0; j < nb; j++) {
            const uint16_t *vp = s.v + slots[j] * s.slot_stride + head_off;
            for (int c = 0; c < ND; c++) vf[j][c] = load_bf16(vp + c * LANES);
        }
        accumulate<ND, LB>(acc, alpha, it.lanes, nb, [&](v16 o, int j, int c, int L) {
            return o + p[j][L] * vf[j][c];
        });
#endif
    }
    float *dst = partials + it.partial;
    for (int L = 0; L < it.lanes; L++, dst += D + 2) {
        dst[0] = m[L / LANES][L % LANES];
        dst[1] = l[L / LANES][L % LANES];
        memcpy(dst + 2, acc[L], sizeof(float) * D);
    }
}

// Sums of 16 vectors: r[j] = the sum of t[j]'s elements, by a tree of half-and-add shuffles.
static inline v16 reduce16(v16 *t) {
    static const v16i LO1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    static const v16i HI1 = LO1 + 8;
    static const v16i LO2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    static const v16i HI2 = LO2 + 4;
    static const v16i LO3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    static const v16i HI3 = LO3 + 2;
    static const v16i LO4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    static const v16i HI4 = LO4 + 1;
    v16 u[8], w[4], x[2];
    for (int i = 0; i < 8; i++)
        u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], LO1) + __builtin_shuffle(t[2 * i], t[2 * i + 1], HI1);
    for (int i = 0; i < 4; i++)
        w[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], LO2) + __builtin_shuffle(u[2 * i], u[2 * i + 1], HI2);
    for (int i = 0; i < 2; i++)
        x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], LO3) + __builtin_shuffle(w[2 * i], w[2 * i + 1], HI3);
    return __builtin_shuffle(x[0], x[1], LO4) + __builtin_shuffle(x[0], x[1], HI4);
}

static inline float hsum(v16 a) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += a[i];
    return s;
}

// The same work item for few lanes (a step's 1-2 rows): keys as rows, a key's score per lane
// from ND FMAs, 16 keys' scores summed at once by reduce16 (the broadcast form would spend
// 16 lanes' FMAs on each of these few).
template <int ND>
static void run_item_few(const Shape &s, const Job &job, const Item &it, float *partials) {
    const int D = ND * LANES;
    v16 qv[FEW_LANES][ND];
    for (int L = 0; L < it.lanes; L++) {
        int lane = it.lane0 + L;
        const float *src = s.q + job.rows[lane / s.G] * s.q_stride
                           + (int64_t)(it.head * s.G + lane % s.G) * D;
        for (int c = 0; c < ND; c++) {
            memcpy(&qv[L][c], src + c * LANES, sizeof(v16));
            qv[L][c] *= s.scale;
        }
    }
#ifdef __AVX512BF16__
    v16p qp[FEW_LANES][ND / 2];  // bf16 pairs: element i of qp[L][c] is dimensions 32c + 2i, +1
    for (int L = 0; L < it.lanes; L++)
        for (int d = 0; d < D; d += 2)
            qp[L][d / 32][(d % 32) / 2] = to_bf16(qv[L][d / LANES][d % LANES])
                                           | to_bf16(qv[L][(d + 1) / LANES][(d + 1) % LANES]) << 16;
#endif
    float m[FEW_LANES], l[FEW_LANES];
    v16 acc[FEW_LANES][ND];
    for (int L = 0; L < it.lanes; L++) {
        m[L] = NEG, l[L] = 0.0f;
        for (int c = 0; c < ND; c++) acc[L][c] = splat(0.0f);
    }
    KeyCursor keys(job, it.key0, it.key1);
    const int64_t head_off = (int64_t)it.head * D;
    int64_t kbase = it.key0;
    static const v16i IOTA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

    int64_t slots[KB];
    for (int nb; (nb = keys.next(slots)) > 0;) {
        v16 t[FEW_LANES][KB];
        v16 vf[KB][ND];
        for (int j = 0; j < KB; j++) {
            if (j >= nb) {
                for (int L = 0; L < it.lanes; L++) t[L][j] = splat(0.0f);
                for (int c = 0; c < ND; c++) vf[j][c] = splat(0.0f);
                continue;
            }
            const uint16_t *kp = s.k + slots[j] * s.slot_stride + head_off;
            const uint16_t *vp = s.v + slots[j] * s.slot_stride + head_off;
            for (int c = 0; c < ND; c++) vf[j][c] = load_bf16(vp + c * LANES);
#ifdef __AVX512BF16__
            v16p kr[ND / 2];
            memcpy(kr, kp, sizeof kr);
            for (int L = 0; L < it.lanes; L++) {
                v16 a = dot2(splat(0.0f), kr[0], qp[L][0]);
                for (int c = 1; c < ND / 2; c++) a = dot2(a, kr[c], qp[L][c]);
                t[L][j] = a;
            }
#else
            v16 kr[ND];
            for (int c = 0; c < ND; c++) kr[c] = load_bf16(kp + c * LANES);
            for (int L = 0; L < it.lanes; L++) {
                v16 a = kr[0] * qv[L][0];
                for (int c = 1; c < ND; c++) a += kr[c] * qv[L][c];
                t[L][j] = a;
            }
#endif
        }
        const int first = (int)(kbase - job.diag0);
        kbase += nb;
        for (int L = 0; L < it.lanes; L++) {
            v16i live = IOTA < nb;
            if (job.causal) live &= IOTA + first <= (it.lane0 + L) / s.G;
            v16 sc = reduce16(t[L]);
            sc = live ? sc : splat(NEG);
            float mn = hmax(sc);
            mn = mn > m[L] ? mn : m[L];
            float al = vexp(splat(m[L] - mn))[0];
            v16 p = vexp(sc - mn);
            p = live ? p : splat(0.0f);
            l[L] = l[L] * al + hsum(p);
            m[L] = mn;
            v16 o[ND];
            for (int c = 0; c < ND; c++) o[c] = acc[L][c] * al;
            for (int j = 0; j < nb; j++)
                for (int c = 0; c < ND; c++) o[c] += p[j] * vf[j][c];
            for (int c = 0; c < ND; c++) acc[L][c] = o[c];
        }
    }
    float *dst = partials + it.partial;
    for (int L = 0; L < it.lanes; L++, dst += D + 2) {
        dst[0] = m[L], dst[1] = l[L];
        memcpy(dst + 2, acc[L], sizeof(float) * D);
    }
}

template <int ND>
static void run_item_nd(const Shape &s, const Job &job, const Item &it, float *partials) {
    if (it.lanes <= FEW_LANES) {
        run_item_few<ND>(s, job, it, partials);
        return;
    }
    switch ((it.lanes + LANES - 1) / LANES) {
        case 1: run_item<ND, 1>(s, job, it, partials); break;
        case 2: run_item<ND, 2>(s, job, it, partials); break;
        case 3: run_item<ND, 3>(s, job, it, partials); break;
        default: run_item<ND, 4>(s, job, it, partials); break;
    }
}

extern "C" {

// The library's interface version: attention_cpu.py refuses a stale build.
int alignserve_cpu_attention_version(void) { return 2; }

// Whether this build's scores use bf16 dot products (queries rounded to bf16), else fp32.
int alignserve_cpu_attention_bf16_scores(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

// q [rows, H, D] fp32 (row stride q_stride floats); k, v: one layer's pools [slots, KVH, D] bf16
// (slot stride slot_stride elements). Jobs: job j reads rows job_rows[row_off[j]:row_off[j+1]]
// and key ranges [rng_lo[i], rng_hi[i]) for i in rng_off[j]:rng_off[j+1], causally where
// causal[j] (see Job). out [n_rows, H, D]
// and lse [n_rows, H] (fp32, natural log) receive, per row, the attention over all its jobs'
// keys: out 0 and lse -inf for a row with none. Returns 0, -1 for an unsupported D, or -2
// when a work buffer cannot be allocated (nothing is written then, nothing leaks).
int alignserve_decode_attention(
    const float *q, int64_t q_stride, const uint16_t *k, const uint16_t *v, int64_t slot_stride,
    int n_rows, int H, int KVH, int D, int n_jobs, const int32_t *row_off, const int32_t *job_rows,
    const int32_t *rng_off, const int32_t *rng_lo, const int32_t *rng_hi, const int32_t *causal,
    float scale,
    float *out, float *lse, int n_threads) {
    if (D != 64 && D != 128) return -1;
    const int G = H / KVH;
    Shape s{q, q_stride, k, v, slot_stride, H, KVH, G, scale};
    struct Buffers {  // the call's work buffers, freed on every return
        void *p[6] = {};
        ~Buffers() { for (void *x : p) free(x); }
    } buf;

    Job *jobs = (Job *)(buf.p[0] = malloc(sizeof(Job) * (n_jobs > 0 ? n_jobs : 1)));
    if (!jobs) return -2;
    int64_t work = 0;
    for (int j = 0; j < n_jobs; j++) {
        Job &jb = jobs[j];
        jb.rows = job_rows + row_off[j];
        jb.n_rows = row_off[j + 1] - row_off[j];
        jb.lo = rng_lo + rng_off[j];
        jb.hi = rng_hi + rng_off[j];
        jb.n_ranges = rng_off[j + 1] - rng_off[j];
        jb.keys = 0;
        for (int i = 0; i < jb.n_ranges; i++) jb.keys += jb.hi[i] - jb.lo[i];
        jb.causal = causal[j] != 0;
        jb.diag0 = jb.keys - jb.n_rows;
        work += jb.keys * KVH * ((jb.n_rows * G + 63) / 64);
    }
    // Chunks of at least 128 keys, small enough for ~4 items per thread.
    int64_t chunk = work / (4 * (n_threads > 0 ? n_threads : 1)) + 1;
    if (chunk < 128) chunk = 128;

    int64_t n_items = 0;
    for (int j = 0; j < n_jobs; j++) {
        if (jobs[j].keys == 0 || jobs[j].n_rows == 0) continue;
        int64_t chunks = (jobs[j].keys + chunk - 1) / chunk;
        n_items += chunks * KVH * ((jobs[j].n_rows * G + 63) / 64);
    }
    Item *items = (Item *)(buf.p[1] = malloc(sizeof(Item) * (n_items > 0 ? n_items : 1)));
    if (!items) return -2;
    // Work items: per job, KV head, block of 64 lanes and key chunk; partials at `partial`.
    int64_t n = 0, floats = 0;
    for (int j = 0; j < n_jobs; j++) {
        const Job &jb = jobs[j];
        if (jb.keys == 0 || jb.n_rows == 0) continue;
        int64_t chunks = (jb.keys + chunk - 1) / chunk;
        int64_t per = (jb.keys + chunks - 1) / chunks;
        int lanes_total = jb.n_rows * G;
        for (int h = 0; h < KVH; h++)
            for (int l0 = 0; l0 < lanes_total; l0 += MAX_TILES * LANES)
                for (int64_t c = 0; c < chunks; c++) {
                    Item &it = items[n++];
                    it.job = j, it.head = h, it.lane0 = l0;
                    it.lanes = lanes_total - l0 < MAX_TILES * LANES ? lanes_total - l0
                                                                    : MAX_TILES * LANES;
                    it.key0 = c * per;
                    it.key1 = (c + 1) * per < jb.keys ? (c + 1) * per : jb.keys;
                    it.partial = floats;
                    floats += (int64_t)it.lanes * (D + 2);
                }
    }
    float *partials = (float *)(buf.p[2] = malloc(sizeof(float) * (floats > 0 ? floats : 1)));
    if (!partials) return -2;

#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t i = 0; i < n_items; i++) {
        if (items[i].key1 <= items[i].key0) {  // an empty tail chunk: a partial of nothing
            float *dst = partials + items[i].partial;
            for (int L = 0; L < items[i].lanes; L++, dst += D + 2) {
                dst[0] = NEG, dst[1] = 0.0f;
                memset(dst + 2, 0, sizeof(float) * D);
            }
            continue;
        }
        if (D == 64) run_item_nd<4>(s, jobs[items[i].job], items[i], partials);
        else run_item_nd<8>(s, jobs[items[i].job], items[i], partials);
    }

    // Index the partials by (row, head): for each item and lane, one entry.
    int64_t entries = 0;
    for (int64_t i = 0; i < n_items; i++) entries += items[i].lanes;
    int64_t *by_rh_off = (int64_t *)(buf.p[3] = calloc((size_t)n_rows * H + 1, sizeof(int64_t)));
    int64_t *by_rh = (int64_t *)(buf.p[4] = malloc(sizeof(int64_t) * (entries > 0 ? entries : 1)));
    int64_t *fill = (int64_t *)(buf.p[5] = malloc(sizeof(int64_t) * ((size_t)n_rows * H + 1)));
    if (!by_rh_off || !by_rh || !fill) return -2;
    for (int64_t i = 0; i < n_items; i++) {
        const Item &it = items[i];
        const Job &jb = jobs[it.job];
        for (int L = 0; L < it.lanes; L++) {
            int lane = it.lane0 + L;
            by_rh_off[(int64_t)jb.rows[lane / G] * H + it.head * G + lane % G + 1]++;
        }
    }
    for (int64_t x = 0; x < (int64_t)n_rows * H; x++) by_rh_off[x + 1] += by_rh_off[x];
    memcpy(fill, by_rh_off, sizeof(int64_t) * ((size_t)n_rows * H + 1));
    for (int64_t i = 0; i < n_items; i++) {
        const Item &it = items[i];
        const Job &jb = jobs[it.job];
        for (int L = 0; L < it.lanes; L++) {
            int lane = it.lane0 + L;
            by_rh[fill[(int64_t)jb.rows[lane / G] * H + it.head * G + lane % G]++] =
                it.partial + (int64_t)L * (D + 2);
        }
    }

#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t x = 0; x < (int64_t)n_rows * H; x++) {
        float *o = out + x * D;
        float mx = NEG;
        for (int64_t e = by_rh_off[x]; e < by_rh_off[x + 1]; e++)
            mx = partials[by_rh[e]] > mx ? partials[by_rh[e]] : mx;
        float sum = 0.0f;
        memset(o, 0, sizeof(float) * D);
        for (int64_t e = by_rh_off[x]; e < by_rh_off[x + 1]; e++) {
            const float *p = partials + by_rh[e];
            if (p[1] == 0.0f) continue;
            float w = expf(p[0] - mx);
            sum += p[1] * w;
            for (int d = 0; d < D; d++) o[d] += w * p[2 + d];
        }
        if (sum > 0.0f) {
            float inv = 1.0f / sum;
            for (int d = 0; d < D; d++) o[d] *= inv;
            lse[x] = mx + logf(sum);
        } else {
            lse[x] = -INFINITY;
        }
    }
    return 0;
}

}  // extern "C"
