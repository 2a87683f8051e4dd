/* bench/c_api.py's C host: the cost of ns_evaluate from C.
 *
 *   c_api_host CONFIG N REPEATS
 * registers N points (microstructure ids k mod 3), evaluates them REPEATS times in one batch
 * and REPEATS times point by point (N calls of one point), and prints one JSON object with
 * the best seconds per batch call and per one-point call. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "neuroscale.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  if (argc != 4) return 2;
  int64_t n = atoll(argv[2]);
  int repeats = atoi(argv[3]), handle;
  int64_t *ids = malloc(sizeof(int64_t) * n), *micro = malloc(sizeof(int64_t) * n);
  double *F = malloc(sizeof(double) * 4 * n), *P = malloc(sizeof(double) * 4 * n);
  double *A = malloc(sizeof(double) * 16 * n), *bound = malloc(sizeof(double) * n);
  int32_t *source = malloc(sizeof(int32_t) * n);
  for (int64_t k = 0; k < n; ++k) {
    ids[k] = k;
    micro[k] = k % 3;
    F[4 * k] = 1.0 + 0.01 * (k % 5), F[4 * k + 1] = 0.005, F[4 * k + 2] = 0.0;
    F[4 * k + 3] = 0.99;
  }
  if (ns_create(argv[1], MPI_Comm_c2f(MPI_COMM_WORLD), &handle) ||
      ns_register(handle, n, ids, micro) || ns_begin_step(handle, 0)) {
    fprintf(stderr, "set-up failed: %s\n", ns_last_error());
    return 1;
  }
  double batch = 1e30, single = 1e30;
  for (int r = 0; r < repeats; ++r) {
    double t0 = now();
    if (ns_evaluate(handle, n, ids, F, P, A, bound, source)) return 1;
    double t1 = now();
    for (int64_t k = 0; k < n; ++k)
      if (ns_evaluate(handle, 1, ids + k, F + 4 * k, P + 4 * k, A + 16 * k, bound + k,
                      source + k))
        return 1;
    double t2 = now();
    batch = t1 - t0 < batch ? t1 - t0 : batch;
    single = (t2 - t1) / n < single ? (t2 - t1) / n : single;
  }
  printf("{\"points\": %lld, \"batch_call_s\": %.6g, \"point_call_s\": %.6g}\n", (long long)n,
         batch, single);
  ns_destroy(handle);
  MPI_Finalize();
  return 0;
}
