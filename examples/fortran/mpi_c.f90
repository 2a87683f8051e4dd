!> The few MPI calls the Fortran demos make, bound to MPI's C functions (and, below, what
!> the demos share). The `mpich` wheel of
!> the venv ships no Fortran bindings (no mpif.h, mpi.mod or mpifort): a host with a full MPI
!> writes `use mpi` instead and drops this module. Handles are MPICH's (an MPI_Comm is an int
!> equal to its Fortran handle); the values are those of the venv's include/mpi.h.
module mpi_c
  use, intrinsic :: iso_c_binding
  implicit none
  private
  integer(c_int), parameter, public :: MPI_COMM_WORLD = int(z'44000000', c_int), &
       MPI_COMM_SELF = int(z'44000001', c_int), MPI_DOUBLE = int(z'4c00080b', c_int), &
       MPI_SUM = int(z'58000003', c_int)
  public :: mpi_start, mpi_stop, mpi_rank_size, mpi_sum_doubles

  interface
     integer(c_int) function MPI_Init(argc, argv) bind(C, name="MPI_Init")
       import :: c_int, c_ptr
       type(c_ptr), value :: argc, argv
     end function MPI_Init
     integer(c_int) function MPI_Finalize() bind(C, name="MPI_Finalize")
       import :: c_int
     end function MPI_Finalize
     integer(c_int) function MPI_Comm_rank(comm, rank) bind(C, name="MPI_Comm_rank")
       import :: c_int
       integer(c_int), value :: comm
       integer(c_int), intent(out) :: rank
     end function MPI_Comm_rank
     integer(c_int) function MPI_Comm_size(comm, size) bind(C, name="MPI_Comm_size")
       import :: c_int
       integer(c_int), value :: comm
       integer(c_int), intent(out) :: size
     end function MPI_Comm_size
     integer(c_int) function MPI_Allreduce(sendbuf, recvbuf, count, datatype, op, comm) &
          bind(C, name="MPI_Allreduce")
       import :: c_int, c_double
       real(c_double), intent(in) :: sendbuf(*)
       real(c_double), intent(out) :: recvbuf(*)
       integer(c_int), value :: count, datatype, op, comm
     end function MPI_Allreduce
  end interface

contains

  subroutine mpi_start()
    integer(c_int) :: ierr
    ierr = MPI_Init(c_null_ptr, c_null_ptr)
  end subroutine mpi_start

  subroutine mpi_stop()
    integer(c_int) :: ierr
    ierr = MPI_Finalize()
  end subroutine mpi_stop

  !> This process's rank in comm and the number of ranks.
  subroutine mpi_rank_size(comm, rank, size)
    integer(c_int), intent(in) :: comm
    integer, intent(out) :: rank, size
    integer(c_int) :: r, s, ierr
    ierr = MPI_Comm_rank(comm, r)
    ierr = MPI_Comm_size(comm, s)
    rank = r
    size = s
  end subroutine mpi_rank_size

  !> x summed over the ranks of comm, in place.
  subroutine mpi_sum_doubles(x, comm)
    real(c_double), intent(inout) :: x(:)
    integer(c_int), intent(in) :: comm
    real(c_double) :: total(size(x))
    integer(c_int) :: ierr
    ierr = MPI_Allreduce(x, total, int(size(x), c_int), MPI_DOUBLE, MPI_SUM, comm)
    x = total
  end subroutine mpi_sum_doubles

end module mpi_c

!> What the Fortran demos share: stop all ranks on a failed NeuroScale call, with its message.
module demo_support
  use, intrinsic :: iso_c_binding
  use mpi_c
  use neuroscale
  implicit none
  private
  public :: check

contains

  subroutine check(code, what)
    integer(c_int), intent(in) :: code
    character(*), intent(in) :: what
    if (code /= NS_OK) then
       print '(a, " failed (code ", i0, "): ", a)', what, code, ns_last_error()
       call mpi_stop()
       stop 1
    end if
  end subroutine check

end module demo_support
