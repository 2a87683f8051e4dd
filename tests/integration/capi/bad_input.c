/* Bad input through the C ABI: every call must return its error code and a message, and the
 * host keep running (a valid call afterwards succeeds). Run on any number of ranks; a bad F̄
 * on rank 0 alone must be an error on every rank.
 *
 *   bad_input GOOD_CONFIG BAD_CONFIG      (BAD_CONFIG holds an unknown key)
 * Prints one line per check; exits 0 if all passed. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>

#include "neuroscale.h"

static int failures = 0;

static void expect(int rc, int code, const char *contains, const char *what) {
  const char *msg = ns_last_error();
  int ok = rc == code && (!contains || strstr(msg, contains));
  if (!ok) ++failures;
  printf("%s %s: code %d, message: %.200s\n", ok ? "ok  " : "FAIL", what, rc, msg);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, h = 0, bad_h = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Fint comm = MPI_Comm_c2f(MPI_COMM_WORLD);
  if (argc != 3) return 2;

  expect(ns_create(argv[2], comm, &bad_h), NS_ERR_INPUT, "unknown key", "unknown config key");
  expect(ns_create("/nonexistent/coupler.yaml", comm, &bad_h), NS_ERR_INPUT, "does not exist",
         "missing config file");
  expect(ns_create(NULL, comm, &bad_h), NS_ERR_INPUT, "NULL", "NULL config path");
  expect(ns_create(argv[1], comm, NULL), NS_ERR_INPUT, "NULL", "NULL handle pointer");
  expect(ns_create(argv[1], comm, &h), NS_OK, "", "valid config");

  int64_t ids[2] = {10 + 2 * rank, 11 + 2 * rank}, micro[2] = {0, 1};
  expect(ns_register(h, 2, NULL, micro), NS_ERR_INPUT, "point_ids is NULL", "NULL point ids");
  expect(ns_register(h, 2, ids, micro), NS_OK, "", "register");

  double F[8] = {1.01, 0.0, 0.0, 0.99, 1.0, 0.01, 0.0, 1.0}, P[8], A[32], bound[2];
  int32_t source[2];
  expect(ns_evaluate(h, 2, ids, NULL, P, A, bound, source), NS_ERR_INPUT, "F is NULL",
         "NULL F");
  expect(ns_evaluate(h, 2, ids, F, NULL, A, bound, source), NS_ERR_INPUT, "P is NULL",
         "NULL P");
  expect(ns_evaluate(h, -1, ids, F, P, A, bound, source), NS_ERR_INPUT, "n = -1",
         "negative n");
  int64_t unknown[2] = {ids[0], 999};
  expect(ns_evaluate(h, 2, unknown, F, P, A, bound, source), NS_ERR_INPUT, "not registered",
         "unregistered point id (n larger than registered)");
  double inverted[8] = {1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0};
  /* only rank 0 passes det F̄ < 0: every rank must get the error */
  expect(ns_evaluate(h, 2, ids, rank == 0 ? inverted : F, P, A, bound, source), NS_ERR_INPUT,
         rank == 0 ? "det F" : "rank 0", "det F <= 0 (rank 0 only)");
  double nan_F[8] = {1.0, 0.0, 0.0, 1.0, NAN, 0.0, 0.0, 1.0};
  expect(ns_evaluate(h, 2, ids, nan_F, P, A, bound, source), NS_ERR_INPUT, "non-finite",
         "NaN in F");
  expect(ns_evaluate(999, 2, ids, F, P, A, bound, source), NS_ERR_INPUT, "handle 999",
         "unknown handle");
  expect(ns_begin_step(h, -3), NS_ERR_INPUT, "step = -3", "negative step");
  expect(ns_restore(h, "/nonexistent"), NS_ERR_CHECKPOINT, "no coupler checkpoint",
         "missing checkpoint");

  /* the host still runs: valid calls succeed, optional outputs may be NULL */
  expect(ns_begin_step(h, 0), NS_OK, "", "begin_step after errors");
  expect(ns_evaluate(h, 2, ids, F, P, NULL, NULL, NULL), NS_OK, "", "evaluate after errors");
  int finite = isfinite(P[0]) && isfinite(P[7]) && P[0] > 0.0;
  if (!finite) ++failures;
  printf("%s stress after errors: P[0] = %g\n", finite ? "ok  " : "FAIL", P[0]);
  ns_step_report report;
  expect(ns_end_step(h, -1, &report), NS_OK, "", "end_step");
  expect(ns_destroy(h), NS_OK, "", "destroy");
  expect(ns_evaluate(h, 2, ids, F, P, A, bound, source), NS_ERR_INPUT, "not a live coupler",
         "evaluate after destroy");
  printf("%s\n", failures ? "FAILED" : "ALL PASSED");
  MPI_Finalize();
  return failures ? 1 : 0;
}
