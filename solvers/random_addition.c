/* Random sequential addition of the disks (spheres) of many cells, each from its own numpy
 * generator default_rng(seed): the same candidates, tests and centres as
 * microstructure._sequential_addition draws one cell at a time (see microstructure.py).
 *
 * numpy's default_rng(seed) is PCG64 (XSL-RR 128/64) seeded by SeedSequence(seed); both are
 * reproduced here word for word (numpy/random/bit_generator.pyx, _pcg64.pyx, pcg64.h), and a
 * double is (next64 >> 11) · 2⁻⁵³ as numpy's random() draws it. */

#include <math.h>
#include <stdint.h>

typedef __uint128_t u128;

#define INIT_A 0x43b0d7e5u
#define MULT_A 0x931e8875u
#define INIT_B 0x8b51f9ddu
#define MULT_B 0x58f38dedu
#define MIX_MULT_L 0xca01f9ddu
#define MIX_MULT_R 0x4973f715u
#define XSHIFT 16
#define POOL 4
#define MAX_DIM 3

static uint32_t hashmix(uint32_t value, uint32_t *hash_const) {
    value ^= *hash_const;
    *hash_const *= MULT_A;
    value *= *hash_const;
    value ^= value >> XSHIFT;
    return value;
}

static uint32_t mix(uint32_t x, uint32_t y) {
    uint32_t result = MIX_MULT_L * x - MIX_MULT_R * y;
    result ^= result >> XSHIFT;
    return result;
}

typedef struct {
    u128 state, inc;
} pcg64;

static const u128 MULTIPLIER = ((u128)2549297995355413924ULL << 64) | 4865540595714422341ULL;

static void step(pcg64 *g) { g->state = g->state * MULTIPLIER + g->inc; }

/* default_rng(seed) for a seed in [0, 2⁶⁴): SeedSequence's pool, generate_state(4, uint64),
 * then pcg64_set_seed */
static void seed_generator(pcg64 *g, uint64_t seed) {
    uint32_t entropy[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const int words = seed >> 32 ? 2 : 1;
    uint32_t pool[POOL], hash_const = INIT_A;
    for (int i = 0; i < POOL; i++) pool[i] = hashmix(i < words ? entropy[i] : 0u, &hash_const);
    for (int src = 0; src < POOL; src++)
        for (int dst = 0; dst < POOL; dst++)
            if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], &hash_const));
    uint32_t state32[8], hb = INIT_B;
    for (int i = 0; i < 8; i++) {
        uint32_t v = pool[i % POOL];
        v ^= hb;
        hb *= MULT_B;
        v *= hb;
        v ^= v >> XSHIFT;
        state32[i] = v;
    }
    uint64_t w[4];
    for (int j = 0; j < 4; j++)
        w[j] = (uint64_t)state32[2 * j] | ((uint64_t)state32[2 * j + 1] << 32);
    const u128 initstate = ((u128)w[0] << 64) | w[1], initseq = ((u128)w[2] << 64) | w[3];
    g->state = 0;
    g->inc = (initseq << 1) | 1u;
    step(g);
    g->state += initstate;
    step(g);
}

static double next_double(pcg64 *g) {
    step(g);
    const uint64_t x = (uint64_t)(g->state >> 64) ^ (uint64_t)g->state;
    const unsigned rot = (unsigned)(g->state >> 122);
    const uint64_t out = (x >> rot) | (x << ((-rot) & 63));
    return (double)(out >> 11) * (1.0 / 9007199254740992.0);
}

/* Cells c < m: counts[c] disks of radius radii[c] in the periodic box (dim = 2 or 3 sides
 * box), each tried on up to `attempts` candidates in turn; centres (m, max_count, dim) filled
 * for each placed cell, placed[c] = 1, else 0 (a disk found no place). Returns 0, or -1 for a
 * dim outside 2–3. */
int ns_sequential_addition(int64_t m, const int64_t *counts, const double *radii, double gap,
                           const uint64_t *seeds, int dim, const double *box, int64_t attempts,
                           int64_t max_count, double *centres, int8_t *placed) {
    if (dim < 2 || dim > MAX_DIM) return -1;
    for (int64_t c = 0; c < m; c++) {
        pcg64 g;
        seed_generator(&g, seeds[c]);
        const double r = radii[c], far = 2 * r + gap, edge_gap = gap / 2;
        double *cell = centres + c * max_count * dim;
        int ok = 1;
        for (int64_t k = 0; k < counts[c] && ok; k++) {
            ok = 0;
            for (int64_t a = 0; a < attempts && !ok; a++) {
                double t[MAX_DIM];
                for (int i = 0; i < dim; i++) t[i] = next_double(&g) * box[i];
                int good = 1;
                for (int i = 0; i < dim; i++) {
                    const double edge = fmin(t[i], box[i] - t[i]);
                    good &= fabs(edge - r) >= edge_gap;
                }
                for (int64_t j = 0; j < k && good; j++) {
                    double d[MAX_DIM];
                    for (int i = 0; i < dim; i++) {
                        d[i] = cell[j * dim + i] - t[i];
                        d[i] -= nearbyint(d[i] / box[i]) * box[i];
                    }
                    double dist = hypot(d[0], d[1]);
                    if (dim == 3) dist = hypot(dist, d[2]);
                    good = dist >= far;
                }
                if (good) {
                    for (int i = 0; i < dim; i++) cell[k * dim + i] = t[i];
                    ok = 1;
                }
            }
        }
        placed[c] = (int8_t)ok;
    }
    return 0;
}
