/* The C side of libneuroscale.so (compiled by neuroscale_couple/capi/build.py with cffi's
 * embedding mode): the error buffer, the start of the embedded Python, and the public entry
 * points of include/neuroscale.h, each of which starts Python if needed and calls its Python
 * implementation nsi_<name> (neuroscale_couple/capi/entry.py). */
#include <Python.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "neuroscale.h"

#define NS_ERROR_SIZE 8192
static _Thread_local char ns_error[NS_ERROR_SIZE];

/* Record the calling thread's error message (the Python side calls it too). */
void nsi_set_error(const char *message) {
  snprintf(ns_error, NS_ERROR_SIZE, "%s", message ? message : "");
}

const char *ns_last_error(void) { return ns_error; }

static pthread_once_t ns_once = PTHREAD_ONCE_INIT;
static int ns_started = NS_ERR_PYTHON;
static char ns_start_error[NS_ERROR_SIZE];

/* Start the interpreter NS_PYTHON (the venv's python, fixed at build time; the environment
 * variable NEUROSCALE_PYTHON overrides it) unless the host is Python itself, then the
 * Python side; a failure is kept as a message, never an exit. */
static void ns_start(void) {
  if (!Py_IsInitialized()) {
    const char *python = getenv("NEUROSCALE_PYTHON");
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* the host's signals stay the host's */
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name,
                                              python && *python ? python : NS_PYTHON);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
      snprintf(ns_start_error, NS_ERROR_SIZE, "the embedded Python (%s) failed to start: %s",
               python && *python ? python : NS_PYTHON, status.err_msg ? status.err_msg : "?");
      return;
    }
    PyEval_SaveThread(); /* cffi takes the GIL per call */
  }
  /* the first extern call runs cffi's init code (entry.py's bind); 1 means it bound */
  if (nsi_start() != 1) {
    snprintf(ns_start_error, NS_ERROR_SIZE, "%s",
             *ns_error ? ns_error : "NeuroScale's Python side failed to start (see stderr)");
    return;
  }
  ns_started = NS_OK;
}

/* NS_OK once Python and neuroscale_couple run; else the start's error, recorded. */
static int ns_ready(void) {
  pthread_once(&ns_once, ns_start);
  if (ns_started != NS_OK) nsi_set_error(ns_start_error);
  return ns_started;
}

#define NS_CALL(call)           \
  do {                          \
    int rc_ = ns_ready();       \
    return rc_ ? rc_ : (call);  \
  } while (0)

int ns_create(const char *config_path, int comm, int *handle) {
  NS_CALL(nsi_create(config_path, comm, handle));
}

int ns_register(int handle, int64_t n, const int64_t *point_ids, const int64_t *micro_ids) {
  NS_CALL(nsi_register(handle, n, point_ids, micro_ids));
}

int ns_evaluate(int handle, int64_t n, const int64_t *point_ids, const double *F, double *P,
                double *A, double *bound, int32_t *source) {
  NS_CALL(nsi_evaluate(handle, n, point_ids, F, P, A, bound, source));
}

int ns_begin_step(int handle, int64_t step) { NS_CALL(nsi_begin_step(handle, step)); }

int ns_end_step(int handle, int64_t steps_left, ns_step_report *report) {
  NS_CALL(nsi_end_step(handle, steps_left, report));
}

int ns_checkpoint(int handle, const char *path) { NS_CALL(nsi_checkpoint(handle, path)); }

int ns_restore(int handle, const char *path) { NS_CALL(nsi_restore(handle, path)); }

int ns_destroy(int handle) { NS_CALL(nsi_destroy(handle)); }
