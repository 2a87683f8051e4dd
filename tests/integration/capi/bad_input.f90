!> Bad input through the Fortran module: wrong shapes (on rank 0 only: an error on every rank)
!> and a DFGRD1 that is not plane strain return NS_ERR_INPUT with a message; valid calls
!> afterwards succeed. `bad_input_f CONFIG`; prints one line per check, exits 0 if all passed.
program bad_input_f
  use, intrinsic :: iso_c_binding
  use mpi_c
  use neuroscale
  use demo_support
  implicit none
  integer(c_int) :: handle, ierr
  integer :: rank, n_ranks, failures
  integer(c_int64_t) :: ids(2), micro(2)
  real(c_double) :: F(2, 2, 2), P(2, 2, 2), P_wrong(2, 2, 3), dfgrd1(3, 3), stress(2, 2), &
       ddsdde(2, 2, 2, 2), statev(NS_NSTATV)
  character(len=4096) :: config

  call mpi_start()
  call mpi_rank_size(MPI_COMM_WORLD, rank, n_ranks)
  call get_command_argument(1, config)
  failures = 0
  call check(ns_create(config, MPI_COMM_WORLD, handle), "ns_create")
  ids = [20_c_int64_t + 2 * rank, 21_c_int64_t + 2 * rank]
  micro = [0_c_int64_t, 1_c_int64_t]
  call check(ns_register(handle, ids, micro), "ns_register")
  call check(ns_begin_step(handle, 0), "ns_begin_step")
  F = 0
  F(1, 1, :) = 1.01_c_double
  F(2, 2, :) = 0.99_c_double
  if (rank == 0) then
     ierr = ns_evaluate(handle, ids, F, P_wrong)
  else
     ierr = ns_evaluate(handle, ids, F, P)
  end if
  call expect(ierr, NS_ERR_INPUT, merge("must have shape", "n = -1         ", rank == 0), &
       "P of the wrong shape (rank 0 only)")
  dfgrd1 = 0
  dfgrd1(1, 1) = 1.01_c_double
  dfgrd1(2, 2) = 0.99_c_double
  dfgrd1(3, 3) = 1.2_c_double
  call ns_umat(handle, ids(1), dfgrd1, stress, ddsdde, statev, ierr)
  call expect(ierr, NS_ERR_INPUT, "not plane strain", "DFGRD1 not plane strain")
  dfgrd1(3, 3) = 1
  statev = 0
  call ns_umat(handle, ids(1), dfgrd1, stress, ddsdde, statev, ierr)
  call expect(ierr, NS_OK, "", "ns_umat after errors")
  ! a stress and a valid source (operator or fine) in STATEV(2)
  if (.not. (stress(1, 1) > 0 .and. any(statev(2) == [0, 1]))) failures = failures + 1
  print '(a, " stress(1, 1) = ", es10.3, ", source ", f3.0)', merge("ok  ", "FAIL", &
       stress(1, 1) > 0 .and. any(statev(2) == [0, 1])), stress(1, 1), statev(2)
  call check(ns_destroy(handle), "ns_destroy")
  if (failures == 0) then
     print '(a)', "ALL PASSED"
  else
     print '(a)', "FAILED"
  end if
  call mpi_stop()
  if (failures > 0) stop 1

contains

  subroutine expect(code, wanted, contains, what)
    integer(c_int), intent(in) :: code, wanted
    character(*), intent(in) :: contains, what
    character(:), allocatable :: message
    logical :: ok
    message = ns_last_error()
    ok = code == wanted .and. index(message, trim(contains)) > 0
    if (.not. ok) failures = failures + 1
    print '(a, 1x, a, ": code ", i0, ", message: ", a)', merge("ok  ", "FAIL", ok), what, code, &
         message
  end subroutine expect

end program bad_input_f
