// Gumbel-max sampling of a batch's rows on the CPU, in one pass over each row's scores.
//
// token = argmax_i x_i / T + g_i, with g_i the noise of the Triton kernel
// (sampling_triton._gumbel): u_i from SplitMix64 at counter i of the row's mixed seed, E = -log u
// (its series near u = 1), g = -log E. A row's draws depend on its seed alone, and are those of
// the GPU kernel up to the last bit of a logarithm. A row with top-k, top-p or min-p comes here
// already filtered (dispatch.sample: -inf outside its kept set); a temperature <= 1e-5 is
// greedy (the argmax of x).
// GCC vector extensions, built with -march=native at first use (cpu_build.py).
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint64_t v8u __attribute__((vector_size(64)));
typedef int32_t v8i __attribute__((vector_size(32)));

static const uint64_t GAMMA = 0x9E3779B97F4A7C15ull;

static inline v16 splat(float x) { return v16{} + x; }

// log(x) for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^9 (error below 1e-9).
static inline v16 vlog(v16 x) {
    v16i bits = (v16i)x;
    v16i e = ((bits >> 23) & 0xff) - 127;
    v16 m = (v16)((bits & 0x7fffff) | 0x3f800000);
    v16i big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e -= big;  // big is -1 where true
    v16 s = (m - 1.0f) / (m + 1.0f);
    v16 s2 = s * s;
    v16 poly = splat(1.0f / 9);
    poly = poly * s2 + 1.0f / 7;
    poly = poly * s2 + 1.0f / 5;
    poly = poly * s2 + 1.0f / 3;
    poly = poly * s2 + 1.0f;
    return __builtin_convertvector(e, v16) * 0.693147180559945f + 2.0f * s * poly;
}

static inline uint64_t mix_seed(uint64_t z) {
    z = z * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
    z = (z ^ (z >> 31)) * GAMMA;
    return z ^ (z >> 29);
}

// The top 23 bits of SplitMix64's outputs at counters c .. c + 7 (state key + (c + 1) gamma).
static inline v8i top_bits(v8u state) {
    v8u z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return __builtin_convertvector(z >> 41, v8i);
}

static int64_t sample_row(const float *x, int vocab, float temperature, uint64_t seed) {
    if (temperature <= 1e-5f) {
        int64_t best = 0;
        for (int i = 1; i < vocab; i++)
            if (x[i] > x[best]) best = i;
        return best;
    }
    const uint64_t key = mix_seed(seed);
    const v8u step = v8u{} + 16 * GAMMA;
    v8u lo = {1, 2, 3, 4, 5, 6, 7, 8}, hi = lo + 8;
    lo = key + lo * GAMMA, hi = key + hi * GAMMA;
    const v16i iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16 best = splat(-INFINITY);
    v16i best_i = v16i{};
    int i = 0;
    for (; i + 16 <= vocab; i += 16, lo += step, hi += step) {
        v8i a = top_bits(lo), b = top_bits(hi);
        v16i k;
        memcpy(&k, &a, sizeof a);
        memcpy((char *)&k + sizeof a, &b, sizeof b);
        v16 kf = __builtin_convertvector(k, v16);
        v16 u = (kf + 0.5f) * 1.1920928955078125e-07f;
        v16 v = ((8388607.0f - kf) + 0.5f) * 1.1920928955078125e-07f;
        v16 series = v * (1.0f + v * (0.5f + v * 0.3333333432674408f));
        v16 e = v < 1e-3f ? series : -vlog(u);
        v16 xs;
        memcpy(&xs, x + i, sizeof xs);
        v16 y = xs / temperature - vlog(e);  // x / T as the reference's filter divides
        v16i better = y > best;
        best = better ? y : best;
        best_i = better ? iota + i : best_i;
    }
    float top = -INFINITY;
    int64_t token = 0;
    for (int l = 0; l < 16; l++)
        if (best[l] > top || (best[l] == top && best_i[l] < token)) top = best[l], token = best_i[l];
    for (; i < vocab; i++) {  // the tail, one token at a time: the same noise, scalar
        uint64_t z = key + (uint64_t)(i + 1) * GAMMA;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z = z ^ (z >> 31);
        float kf = (float)(z >> 41);
        float u = (kf + 0.5f) * 1.1920928955078125e-07f;
        float v = ((8388607.0f - kf) + 0.5f) * 1.1920928955078125e-07f;
        float e = v < 1e-3f ? v * (1.0f + v * (0.5f + v * 0.3333333432674408f)) : -logf(u);
        float y = x[i] / temperature - logf(e);
        if (y > top) top = y, token = i;
    }
    return token;
}

extern "C" {

int alignserve_cpu_sampling_version(void) { return 1; }

// x [rows, vocab] fp32 (row stride `stride` floats), temperature [rows], seeds [rows] -> out.
void alignserve_sample_gumbel(const float *x, int64_t stride, int rows, int vocab,
                              const float *temperature, const uint64_t *seeds, int64_t *out,
                              int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int r = 0; r < rows; r++)
        out[r] = sample_row(x + r * stride, vocab, temperature[r], seeds[r]);
}

}  // extern "C"
