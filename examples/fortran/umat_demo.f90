!> A Fortran host of NeuroScale's UMAT-style routine: the C demo's points and load path
!> (examples/c/coupler_demo.c), each step's first iterate point by point (ns_umat, as a code
!> that calls its material routine per integration point) and its second in one batch
!> (ns_umat_batch, as a code that hands over an element or patch).
!>
!>   umat_demo CONFIG OUT_PREFIX
!>
!> Rank r writes every answer to OUT_PREFIX.rank<r>.txt in the C demo's format:
!>   call step point_id micro_id F̄(4) source bound P̄(4) A(16)      (row-major)
program umat_demo
  use, intrinsic :: iso_c_binding
  use mpi_c
  use neuroscale
  use demo_support
  implicit none
  integer, parameter :: n_points = 8, n_steps = 2
  integer(c_int) :: handle, ierr
  integer :: rank, size, n, i, k, step, call_no, unit
  integer(c_int64_t), allocatable :: ids(:), micro(:)
  real(c_double), allocatable :: dfgrd(:, :, :), stress(:, :, :), ddsdde(:, :, :, :, :), &
       statev(:, :)
  character(len=4096) :: config, prefix, name
  type(ns_step_report) :: report

  call mpi_start()
  call mpi_rank_size(MPI_COMM_WORLD, rank, size)
  call get_command_argument(1, config)
  call get_command_argument(2, prefix)
  call check(ns_create(config, MPI_COMM_WORLD, handle), "ns_create")

  ! this rank's points k = rank, rank + size, ... and their microstructure ids k mod 3
  n = 0
  allocate (ids(n_points), micro(n_points))
  do k = rank, n_points - 1, size
     n = n + 1
     ids(n) = k
     micro(n) = mod(k, 3)
  end do
  ids = ids(1:n)
  micro = micro(1:n)
  allocate (dfgrd(3, 3, n), stress(2, 2, n), ddsdde(2, 2, 2, 2, n), statev(NS_NSTATV, n))
  statev = 0
  call check(ns_register(handle, ids, micro), "ns_register")
  write (name, '(a, ".rank", i0, ".txt")') trim(prefix), rank
  open (newunit=unit, file=trim(name), status="replace", action="write")

  call_no = 0
  do step = 0, n_steps - 1
     call check(ns_begin_step(handle, step), "ns_begin_step")
     ! first iterate: one point per call
     call loads(real(step + 1, c_double) / n_steps - 0.02_c_double)
     do i = 1, n
        call ns_umat(handle, ids(i), dfgrd(:, :, i), stress(:, :, i), ddsdde(:, :, :, :, i), &
             statev(:, i), ierr)
        call check(ierr, "ns_umat")
        call record(i, i)
        call_no = call_no + 1
     end do
     ! second iterate (the converged state): the whole batch in one call
     call loads(real(step + 1, c_double) / n_steps)
     call ns_umat_batch(handle, ids, dfgrd, stress, ddsdde, statev, ierr)
     call check(ierr, "ns_umat_batch")
     call record(1, n)
     call_no = call_no + 1
     call check(ns_end_step(handle, n_steps - 1 - step, report), "ns_end_step")
     if (rank == 0) print '("step ", i0, ": ", i0, " fallback points, ", i0, " fine solves")', &
          step, report%fallback_points, report%fine_solves
  end do
  close (unit)
  call check(ns_destroy(handle), "ns_destroy")
  call mpi_stop()

contains

  !> F̄ = I + t·G_k of the C demo, as a plane-strain DFGRD1 (3, 3).
  subroutine loads(t)
    real(c_double), intent(in) :: t
    integer :: j
    do j = 1, n
       dfgrd(:, :, j) = 0
       dfgrd(1, 1, j) = 1 + t * 0.02_c_double * (1 + mod(ids(j), 4_c_int64_t))
       dfgrd(1, 2, j) = t * 0.01_c_double * mod(ids(j), 3_c_int64_t)
       dfgrd(2, 1, j) = -t * 0.005_c_double * mod(ids(j), 2_c_int64_t)
       dfgrd(2, 2, j) = 1 - t * 0.008_c_double * (1 + mod(ids(j), 2_c_int64_t))
       dfgrd(3, 3, j) = 1
    end do
  end subroutine loads

  !> Write points first..last of the current call, row-major like the C demo.
  subroutine record(first, last)
    integer, intent(in) :: first, last
    integer :: j, a, b, c, d
    do j = first, last
       write (unit, '(i0, 1x, i0, 1x, i0, 1x, i0, 4(1x, es24.16e3), 1x, i0, 21(1x, es24.16e3))') &
            call_no, step, ids(j), micro(j), ((dfgrd(a, b, j), b=1, 2), a=1, 2), &
            nint(statev(2, j)), statev(1, j), ((stress(a, b, j), b=1, 2), a=1, 2), &
            ((((ddsdde(a, b, c, d, j), d=1, 2), c=1, 2), b=1, 2), a=1, 2)
    end do
  end subroutine record

end program umat_demo
