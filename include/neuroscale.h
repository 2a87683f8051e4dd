/* NeuroScale C ABI: the FE² Coupler (neural operator + calibrated bound + fallback to the
 * true fine solver) for C, C++ and Fortran hosts.
 *
 * Build the library with `make capi` (build/capi/libneuroscale.so); link a host with
 *   mpicc host.c -Iinclude -Lbuild/capi -lneuroscale -Wl,-rpath,$PWD/build/capi
 * The library starts an embedded Python (the project's venv interpreter) on the first call
 * and runs neuroscale_couple.Coupler; see docs/c_api.md.
 *
 * Conventions
 * - 2D plane strain. F̄, P̄ are 2×2, the tangent A = ∂P̄/∂F̄ is 2×2×2×2
 *   (A[i][j][k][l] = ∂P̄_ij/∂F̄_kl); all arrays are float64, row-major (C order), the point
 *   index first: F (n, 2, 2), P (n, 2, 2), A (n, 2, 2, 2, 2), bound (n), source (n).
 *   Stress and tangent are in the units of the fine solver's moduli (GPa for the shipped
 *   composite).
 * - Every function returns NS_OK (0) or an error code; ns_last_error() gives the message of
 *   the last error of the calling thread. No input ever aborts or exits the host.
 * - Functions marked "collective" must be called by every rank of the coupler's
 *   communicator; an error on one rank (a null pointer, a wrong shape, det F̄ ≤ 0) is
 *   returned on every rank, so no rank is left waiting. Only an unknown handle is
 *   answered on the calling rank alone.
 * - The communicator crosses as a Fortran handle: MPI_Comm_c2f(comm) from C, the integer
 *   handle from Fortran (MPI_Fint, an int in every MPI we know).
 */
#ifndef NEUROSCALE_H
#define NEUROSCALE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NS_OK 0
#define NS_ERR_INPUT 1      /* bad argument: null pointer, shape, det F̄ ≤ 0, config key */
#define NS_ERR_SOLVE 2      /* fine solves failed beyond the policy's failure ratio */
#define NS_ERR_CHECKPOINT 3 /* a checkpoint is missing, corrupt or of another run */
#define NS_ERR_RUNTIME 4    /* any other error inside NeuroScale */
#define NS_ERR_PYTHON 5     /* the embedded Python or neuroscale_couple failed to start */

/* Where a point's stress came from (ns_evaluate's source). */
#define NS_SOURCE_OPERATOR 0
#define NS_SOURCE_FINE 1
#define NS_SOURCE_FAILED 2

/* Global figures of a load step (ns_end_step); times are seconds, max over ranks. */
typedef struct ns_step_report {
  int64_t fallback_points; /* points that used the fine solver in the step */
  int64_t fine_solves;     /* fine solves in the step */
  int64_t fine_failed;     /* fine solves that failed (kept the operator's value) */
  int64_t outside_points;  /* points outside the model's training region */
  int64_t model_version;   /* the operator's version after the step (retraining bumps it) */
  double fine_time_s;      /* wall time of the fallback stage */
  double operator_time_s;  /* wall time of the operator */
  double retrain_time_s;   /* wall time spent retraining at the end of the step */
} ns_step_report;

/* NS_API_BEGIN: one prototype per statement (the build reads this block). */

/* Create a coupler from a YAML config (the keys of Coupler.from_config: model, fine, policy,
 * retrain, replay_dir, ... plus `microstructures`, which maps microstructure ids to
 * structures) on the communicator `comm` (an MPI_Fint). Collective. *handle > 0 on
 * success. */
int ns_create(const char *config_path, int comm, int *handle);

/* Attach microstructure micro_ids[k] to this rank's point point_ids[k], k < n (n ≥ 0, ids
 * unique over all ranks), and encode them. Replaces an earlier registration. Collective. */
int ns_register(int handle, int64_t n, const int64_t *point_ids, const int64_t *micro_ids);

/* Evaluate n registered points at F (n, 2, 2): stress P (n, 2, 2); tangent A
 * (n, 2, 2, 2, 2), calibrated error bound on ‖P̄‖ (n, stress units, NaN where no operator
 * ran) and source (n, NS_SOURCE_*) are written where not NULL. One call per residual
 * evaluation of the host's Newton solve. Collective. */
int ns_evaluate(int handle, int64_t n, const int64_t *point_ids, const double *F, double *P,
                double *A, double *bound, int32_t *source);

/* Start load step `step` (≥ 0) or a cut-back retry of it. Collective. */
int ns_begin_step(int handle, int64_t step);

/* End the current load step: store its fine solves, retrain if due; steps_left: load steps
 * still to come (-1: unknown). The step's global figures go to *report when not NULL.
 * Collective. */
int ns_end_step(int handle, int64_t steps_left, ns_step_report *report);

/* Write the coupler's state (and the operator, once retrained) into the folder `path`,
 * atomically, one file per rank. Call between load steps. Collective. */
int ns_checkpoint(int handle, const char *path);

/* Restore a state written by ns_checkpoint (after ns_register of the same points; on any
 * number of ranks). Collective. */
int ns_restore(int handle, const char *path);

/* Close the coupler and free its handle. Collective. */
int ns_destroy(int handle);

/* NS_API_END */

/* The message of the calling thread's last error ("" if none); valid until its next call. */
const char *ns_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* NEUROSCALE_H */
