/* The 2D basis-mixture operator in the loop, one pass over the points (see kernels.py).
 *
 * For each point p: F̄ (2×2, row-major), its latent row; writes the energy W̄, stress P̄ (2×2),
 * tangent A (2×2×2×2, index order i J k L) of the members' mean weights, the members' spread
 * mean_m ‖P̄(w_m − w̄)‖² and, with a strain-quadratic covariance head, tr(L Lᵀ) of its factor.
 * The formulas are those of heads.mixture_response (torch), term for term, in float64; the
 * members' differences and the head's coefficients are read as float64 or float32
 * (bound64 ≠ 0 or not). */

#include <math.h>
#include <stdint.h>

#define MAX_DIRECTIONS 16
#define FEATURES 10 /* 1, ê (3), êᵢêⱼ i ≤ j (6) */
#define FACTOR 4    /* d² */

typedef struct {
    double C00, C11, C01, L, psi, i00, i11, i01;
    double I4[MAX_DIRECTIONS], lnI4[MAX_DIRECTIONS];
    double g3[MAX_DIRECTIONS], g4[MAX_DIRECTIONS]; /* ln I₄ / I₄ and 1 − 1/I₄ */
} kinematics;

/* entry i of an array of float64 (f64 ≠ 0) or float32 */
static inline double value(const void *a, int64_t i, int f64) {
    return f64 ? ((const double *)a)[i] : (double)((const float *)a)[i];
}

/* f_ψ, f_L and G = ∂W̄/∂C̄ (00, 11, 01) of the weights w (K; float64 or float32) */
static void gradient(const void *w, int f64, int K, const kinematics *k, int nd,
                     const double *cc, const double *ss, const double *cs, int quartic,
                     double *f_p, double *f_L, double G[3]) {
    double fp = value(w, 0, f64), fL = 0.25 * value(w, 1, f64) * k->L;
    if (quartic) {
        const double w5 = value(w, K - 3, f64), w6 = value(w, K - 2, f64);
        fp += 2.0 * w5 * k->psi + 0.25 * w6 * k->L * k->L;
        fL += 0.5 * w6 * k->psi * k->L + 0.25 * value(w, K - 1, f64) * k->L * k->L * k->L;
    }
    double g00 = fp * 0.5 * (1.0 - k->i00) + fL * k->i00;
    double g11 = fp * 0.5 * (1.0 - k->i11) + fL * k->i11;
    double g01 = fp * (-0.5 * k->i01) + fL * k->i01;
    for (int a = 0; a < nd; a++) {
        const double g = value(w, 2 + a, f64) * k->g3[a] + value(w, 2 + nd + a, f64) * k->g4[a];
        g00 += g * cc[a];
        g11 += g * ss[a];
        g01 += g * cs[a];
    }
    *f_p = fp;
    *f_L = fL;
    G[0] = g00;
    G[1] = g11;
    G[2] = g01;
}

static double softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

/* Points are taken in the order ``order`` (n; NULL: 0, 1, …): that of their latent rows, so
 * that the per-latent arrays are read front to back.
 * Returns 0, or -1 for more than MAX_DIRECTIONS directions or a factor of R ≠ 0, 10 entries.
 * A point whose det C̄ or stretch I₄ is not positive gets NaN (the log of it), as in torch. */
int ns_closed_form_2d(int64_t n, const double *F, const int64_t *rows, const int64_t *order,
                      int K, const double *w_mean, int M, const void *w_dev, int R,
                      const void *coef, int bound64, int nd, const double *cc, const double *ss,
                      const double *cs, int quartic, double e_ref, double diag_offset,
                      double min_diag, double *stress, double *tangent, double *energy,
                      double *alea, double *epi) {
    if (nd > MAX_DIRECTIONS || (R != 0 && R != FACTOR * (FACTOR + 1) / 2)) return -1;
    for (int64_t q = 0; q < n; q++) {
        const int64_t p = order ? order[q] : q;
        const double *f = F + 4 * p;
        const double F00 = f[0], F01 = f[1], F10 = f[2], F11 = f[3];
        const int64_t row = rows[p];
        const double *w = w_mean + row * K;
        kinematics k;
        k.C00 = F00 * F00 + F10 * F10;
        k.C11 = F01 * F01 + F11 * F11;
        k.C01 = F00 * F01 + F10 * F11;
        const double D = k.C00 * k.C11 - k.C01 * k.C01;
        k.L = log(D);
        k.psi = 0.5 * (k.C00 + k.C11 - 2.0 - k.L);
        k.i00 = k.C11 / D;
        k.i11 = k.C00 / D;
        k.i01 = -k.C01 / D;
        for (int a = 0; a < nd; a++) {
            k.I4[a] = k.C00 * cc[a] + k.C11 * ss[a] + 2.0 * k.C01 * cs[a];
            k.lnI4[a] = log(k.I4[a]);
            k.g3[a] = k.lnI4[a] / k.I4[a];
            k.g4[a] = 1.0 - 1.0 / k.I4[a];
        }
        const double L = k.L, psi = k.psi, i00 = k.i00, i11 = k.i11, i01 = k.i01;
        /* energy */
        double W = (double)w[0] * psi + 0.125 * w[1] * L * L;
        for (int a = 0; a < nd; a++)
            W += w[2 + a] * (0.5 * k.lnI4[a] * k.lnI4[a])
                 + w[2 + nd + a] * (k.I4[a] - 1.0 - k.lnI4[a]);
        if (quartic)
            W += w[K - 3] * psi * psi + 0.25 * w[K - 2] * psi * L * L
                 + 0.0625 * w[K - 1] * (L * L) * (L * L);
        energy[p] = W;
        /* stress P̄ = 2 F̄ G */
        double f_p, f_L, G[3];
        gradient(w, 1, K, &k, nd, cc, ss, cs, quartic, &f_p, &f_L, G);
        double *P = stress + 4 * p;
        P[0] = 2.0 * (F00 * G[0] + F01 * G[2]);
        P[1] = 2.0 * (F00 * G[2] + F01 * G[1]);
        P[2] = 2.0 * (F10 * G[0] + F11 * G[2]);
        P[3] = 2.0 * (F10 * G[2] + F11 * G[1]);
        /* H = ∂²W̄/∂C̄² over the Voigt pairs (00, 11, 01) */
        double f_LL = 0.25 * w[1];
        if (quartic) f_LL += 0.5 * w[K - 2] * psi + 0.75 * w[K - 1] * L * L;
        const double s_ = 0.5 * f_p - f_L;
        double H[3][3];
        H[0][0] = s_ * i00 * i00 + f_LL * i00 * i00;
        H[1][1] = s_ * i11 * i11 + f_LL * i11 * i11;
        H[2][2] = s_ * 0.5 * (i00 * i11 + i01 * i01) + f_LL * i01 * i01;
        H[0][1] = s_ * i01 * i01 + f_LL * i00 * i11;
        H[0][2] = s_ * i00 * i01 + f_LL * i00 * i01;
        H[1][2] = s_ * i11 * i01 + f_LL * i11 * i01;
        for (int a = 0; a < nd; a++) {
            const double eta = (w[2 + a] * (1.0 - k.lnI4[a]) + w[2 + nd + a])
                               / (k.I4[a] * k.I4[a]);
            H[0][0] += eta * (cc[a] * cc[a]);
            H[1][1] += eta * (ss[a] * ss[a]);
            H[2][2] += eta * (cs[a] * cs[a]);
            H[0][1] += eta * (cc[a] * ss[a]);
            H[0][2] += eta * (cc[a] * cs[a]);
            H[1][2] += eta * (ss[a] * cs[a]);
        }
        if (quartic) { /* + f_ψψ B⊗B + f_ψL (B⊗C̄⁻¹ + C̄⁻¹⊗B) */
            const double bb = 2.0 * w[K - 3], bi = 0.5 * w[K - 2] * L;
            const double b[3] = {0.5 * (1.0 - i00), 0.5 * (1.0 - i11), -0.5 * i01};
            const double ci[3] = {i00, i11, i01};
            for (int q0 = 0; q0 < 3; q0++)
                for (int q1 = q0; q1 < 3; q1++)
                    H[q0][q1] += bb * b[q0] * b[q1] + bi * (b[q0] * ci[q1] + ci[q0] * b[q1]);
        }
        H[1][0] = H[0][1];
        H[2][0] = H[0][2];
        H[2][1] = H[1][2];
        /* A_iJkL = 2 δ_ik G_JL + 4 (F̄ h^{JL} F̄ᵀ)_ik, h^{JL}_IK = H_IJKL; Voigt of (I, J):
         * (0,0) → 0, (1,1) → 1, (0,1), (1,0) → 2; blocks (J, L) = (0,0), (1,1), (0,1) */
        static const int v[2][2] = {{0, 2}, {2, 1}};
        static const int blockJ[3] = {0, 1, 0}, blockL[3] = {0, 1, 1};
        double T[3][2][2];
        for (int blk = 0; blk < 3; blk++) {
            const int J = blockJ[blk], Lb = blockL[blk];
            const double h00 = H[v[0][J]][v[0][Lb]], h01 = H[v[0][J]][v[1][Lb]];
            const double h10 = H[v[1][J]][v[0][Lb]], h11 = H[v[1][J]][v[1][Lb]];
            const double Y00 = F00 * h00 + F01 * h10, Y01 = F00 * h01 + F01 * h11;
            const double Y10 = F10 * h00 + F11 * h10, Y11 = F10 * h01 + F11 * h11;
            T[blk][0][0] = 4.0 * (Y00 * F00 + Y01 * F01) + 2.0 * G[blk];
            T[blk][0][1] = 4.0 * (Y00 * F10 + Y01 * F11);
            T[blk][1][0] = 4.0 * (Y10 * F00 + Y11 * F01);
            T[blk][1][1] = 4.0 * (Y10 * F10 + Y11 * F11) + 2.0 * G[blk];
        }
        double *A = tangent + 16 * p; /* A[i][J][k][L] at 8 i + 4 J + 2 k + L */
        for (int i = 0; i < 2; i++)
            for (int kk = 0; kk < 2; kk++) {
                A[8 * i + 2 * kk] = T[0][i][kk];
                A[8 * i + 4 + 2 * kk + 1] = T[1][i][kk];
                A[8 * i + 2 * kk + 1] = T[2][i][kk];
                A[8 * i + 4 + 2 * kk] = T[2][kk][i]; /* major symmetry */
            }
        /* the members' spread: mean_m ‖P̄(w_m − w̄)‖² = 4 tr(C̄ G²) of each difference */
        double spread = 0.0;
        for (int m = 0; m < M; m++) {
            double fp, fL, g[3];
            const char *wm = (const char *)w_dev + (row * M + m) * K * (bound64 ? 8 : 4);
            gradient(wm, bound64, K, &k, nd, cc, ss, cs, quartic, &fp, &fL, g);
            spread += 4.0 * (k.C00 * (g[0] * g[0] + g[2] * g[2])
                             + k.C11 * (g[1] * g[1] + g[2] * g[2])
                             + 2.0 * k.C01 * g[2] * (g[0] + g[1]));
        }
        epi[p] = spread / M;
        if (R == 0) continue;
        /* a quadratic covariance head: raw_r = Σ_k c_rk φ_k(ê), ê = Mandel(Ē)/e_ref */
        const double e0 = 0.5 * (k.C00 - 1.0) / e_ref, e1 = 0.5 * (k.C11 - 1.0) / e_ref;
        const double e2 = k.C01 / sqrt(2.0) / e_ref;
        const double phi[FEATURES] = {1.0, e0, e1, e2, e0 * e0, e0 * e1, e0 * e2,
                                      e1 * e1, e1 * e2, e2 * e2};
        const int64_t c = row * R * FEATURES;
        double raw[FACTOR * (FACTOR + 1) / 2];
        for (int r = 0; r < R; r++) {
            double acc = 0.0;
            for (int q = 0; q < FEATURES; q++)
                acc += value(coef, c + r * FEATURES + q, bound64) * phi[q];
            raw[r] = acc;
        }
        /* tr(L Lᵀ) of L = D (I + O), entries in row-major lower-triangle order */
        double norm2 = 0.0;
        int start = 0;
        for (int i = 0; i < FACTOR; i++) {
            double off = 0.0;
            for (int j = 0; j < i; j++) off += raw[start + j] * raw[start + j];
            const double d = softplus(raw[start + i] + diag_offset) + min_diag;
            norm2 += d * d * (1.0 + off);
            start += i + 1;
        }
        alea[p] = norm2;
    }
    return 0;
}
