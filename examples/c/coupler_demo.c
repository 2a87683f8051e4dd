/* A C host of the NeuroScale Coupler: N points spread over the MPI ranks, two load steps of
 * a homogeneous stretch with shear, two "Newton iterates" per step.
 *
 *   coupler_demo CONFIG OUT_PREFIX
 *
 * Each point k has its own load path F̄_k(t) = I + t·G_k and microstructure id k mod 3; the
 * Coupler answers P̄ (first Piola–Kirchhoff stress), A = ∂P̄/∂F̄, the calibrated error bound
 * and the source (operator or fine RVE solve). Rank r writes every answer to
 * OUT_PREFIX.rank<r>.txt, one line per point and evaluation (what the tests replay through the
 * Python API):
 *   call step point_id micro_id F̄(4) source bound P̄(4) A(16)      (row-major)
 * (call: the number of the ns_evaluate call, from 0).
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "neuroscale.h"

#define N_POINTS 8
#define N_STEPS 2

/* Print the failing call's code and message; return the code. */
static int check(int rc, const char *what) {
  if (rc != NS_OK) fprintf(stderr, "%s failed (code %d): %s\n", what, rc, ns_last_error());
  return rc;
}

/* F̄ of point k at load t: I + t·G_k, G_k a stretch along x with shear (row-major 2×2). */
static void load(int64_t k, double t, double F[4]) {
  F[0] = 1.0 + t * 0.02 * (1 + k % 4);
  F[1] = t * 0.01 * (k % 3);
  F[2] = -t * 0.005 * (k % 2);
  F[3] = 1.0 - t * 0.008 * (1 + k % 2);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size, handle, rc = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (argc != 3) {
    if (rank == 0) fprintf(stderr, "usage: %s CONFIG OUT_PREFIX\n", argv[0]);
    MPI_Finalize();
    return 2;
  }
  /* 1. the coupler, on the host's communicator (as an MPI_Fint) */
  if (check(ns_create(argv[1], MPI_Comm_c2f(MPI_COMM_WORLD), &handle), "ns_create")) {
    MPI_Finalize();
    return 1;
  }
  /* 2. this rank's points (ids unique over the ranks) and their microstructure ids */
  int64_t ids[N_POINTS], micro[N_POINTS], n = 0;
  for (int64_t k = rank; k < N_POINTS; k += size) {
    ids[n] = k;
    micro[n++] = k % 3;
  }
  double *F = malloc(sizeof(double) * 4 * (n ? n : 1));
  double *P = malloc(sizeof(double) * 4 * (n ? n : 1));
  double *A = malloc(sizeof(double) * 16 * (n ? n : 1));
  double *bound = malloc(sizeof(double) * (n ? n : 1));
  int32_t *source = malloc(sizeof(int32_t) * (n ? n : 1));
  char name[4096];
  snprintf(name, sizeof name, "%s.rank%d.txt", argv[2], rank);
  FILE *out = fopen(name, "w");
  rc = check(ns_register(handle, n, ids, micro), "ns_register");
  /* 3. load steps: a Newton solve calls ns_evaluate once per residual evaluation */
  for (int step = 0; !rc && step < N_STEPS; ++step) {
    rc = check(ns_begin_step(handle, step), "ns_begin_step");
    for (int it = 0; !rc && it < 2; ++it) {
      double t = (step + 1.0) / N_STEPS - (it == 0 ? 0.02 : 0.0); /* iterate → converged */
      for (int64_t i = 0; i < n; ++i) load(ids[i], t, F + 4 * i);
      rc = check(ns_evaluate(handle, n, ids, F, P, A, bound, source), "ns_evaluate");
      for (int64_t i = 0; !rc && i < n; ++i) {
        fprintf(out, "%d %d %lld %lld", 2 * step + it, step, (long long)ids[i],
                (long long)micro[i]);
        for (int c = 0; c < 4; ++c) fprintf(out, " %.17g", F[4 * i + c]);
        fprintf(out, " %d %.17g", source[i], bound[i]);
        for (int c = 0; c < 4; ++c) fprintf(out, " %.17g", P[4 * i + c]);
        for (int c = 0; c < 16; ++c) fprintf(out, " %.17g", A[16 * i + c]);
        fprintf(out, "\n");
      }
    }
    ns_step_report report;
    if (!rc) rc = check(ns_end_step(handle, N_STEPS - 1 - step, &report), "ns_end_step");
    if (!rc && rank == 0)
      printf("step %d: %lld fallback points, %lld fine solves, model version %lld\n", step,
             (long long)report.fallback_points, (long long)report.fine_solves,
             (long long)report.model_version);
  }
  /* 4. tear down */
  if (check(ns_destroy(handle), "ns_destroy") && !rc) rc = 1;
  fclose(out);
  free(F), free(P), free(A), free(bound), free(source);
  MPI_Finalize();
  return rc ? 1 : 0;
}
