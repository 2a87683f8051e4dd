!> NeuroScale from Fortran: the C ABI of neuroscale.h through iso_c_binding, Fortran-shaped
!> wrappers, and a UMAT-style material routine (one point, or a batch of them).
!>
!> Compile this file with the host (a .mod file is compiler-specific, so the source ships):
!>   gfortran -c neuroscale.f90; gfortran host.f90 neuroscale.o -L<lib> -lneuroscale ...
!>
!> Shapes are Fortran's (column-major) with the natural indices: F(i, j, k) = F̄_ij of point k,
!> P(i, j, k) = P̄_ij, A(i, j, m, l, k) = ∂P̄_ij/∂F̄_ml; the wrappers reorder to the C ABI's
!> row-major arrays. 2D plane strain; stress in the units of the fine solver's moduli.
!> Every function returns NS_OK (0) or an NS_ERR_* code, with the message in ns_last_error().
!> Calls marked collective are made by every rank of the coupler's communicator; a wrong
!> shape on one rank is an error on every rank.
module neuroscale
  use, intrinsic :: iso_c_binding
  implicit none
  private

  integer(c_int), parameter, public :: NS_OK = 0, NS_ERR_INPUT = 1, NS_ERR_SOLVE = 2, &
       NS_ERR_CHECKPOINT = 3, NS_ERR_RUNTIME = 4, NS_ERR_PYTHON = 5
  integer(c_int32_t), parameter, public :: NS_SOURCE_OPERATOR = 0, NS_SOURCE_FINE = 1, &
       NS_SOURCE_FAILED = 2
  !> STATEV entries ns_umat keeps per point: (1) the calibrated error bound of its stress,
  !> (2) the source of its last answer (NS_SOURCE_*), (3) how many answers came from the
  !> fine solver.
  integer, parameter, public :: NS_NSTATV = 3

  !> Global figures of a load step (ns_end_step); seconds are maxima over the ranks.
  type, bind(C), public :: ns_step_report
     integer(c_int64_t) :: fallback_points, fine_solves, fine_failed, outside_points, &
          model_version
     real(c_double) :: fine_time_s, operator_time_s, retrain_time_s
  end type ns_step_report

  public :: ns_create, ns_register, ns_evaluate, ns_begin_step, ns_end_step, ns_checkpoint, &
       ns_restore, ns_destroy, ns_last_error, ns_umat, ns_umat_batch

  interface
     integer(c_int) function c_create(config, comm, handle) bind(C, name="ns_create")
       import :: c_int, c_char
       character(kind=c_char), intent(in) :: config(*)
       integer(c_int), value :: comm
       integer(c_int), intent(out) :: handle
     end function c_create
     integer(c_int) function c_register(handle, n, point_ids, micro_ids) &
          bind(C, name="ns_register")
       import :: c_int, c_int64_t
       integer(c_int), value :: handle
       integer(c_int64_t), value :: n
       integer(c_int64_t), intent(in) :: point_ids(*), micro_ids(*)
     end function c_register
     integer(c_int) function c_evaluate(handle, n, point_ids, F, P, A, bound, source) &
          bind(C, name="ns_evaluate")
       import :: c_int, c_int64_t, c_double, c_ptr
       integer(c_int), value :: handle
       integer(c_int64_t), value :: n
       integer(c_int64_t), intent(in) :: point_ids(*)
       real(c_double), intent(in) :: F(*)
       real(c_double), intent(out) :: P(*)
       type(c_ptr), value :: A, bound, source
     end function c_evaluate
     integer(c_int) function c_begin_step(handle, step) bind(C, name="ns_begin_step")
       import :: c_int, c_int64_t
       integer(c_int), value :: handle
       integer(c_int64_t), value :: step
     end function c_begin_step
     integer(c_int) function c_end_step(handle, steps_left, report) bind(C, name="ns_end_step")
       import :: c_int, c_int64_t, ns_step_report
       integer(c_int), value :: handle
       integer(c_int64_t), value :: steps_left
       type(ns_step_report), intent(out) :: report
     end function c_end_step
     integer(c_int) function c_checkpoint(handle, path) bind(C, name="ns_checkpoint")
       import :: c_int, c_char
       integer(c_int), value :: handle
       character(kind=c_char), intent(in) :: path(*)
     end function c_checkpoint
     integer(c_int) function c_restore(handle, path) bind(C, name="ns_restore")
       import :: c_int, c_char
       integer(c_int), value :: handle
       character(kind=c_char), intent(in) :: path(*)
     end function c_restore
     integer(c_int) function c_destroy(handle) bind(C, name="ns_destroy")
       import :: c_int
       integer(c_int), value :: handle
     end function c_destroy
     type(c_ptr) function c_last_error() bind(C, name="ns_last_error")
       import :: c_ptr
     end function c_last_error
     subroutine c_set_error(message) bind(C, name="nsi_set_error")
       import :: c_char
       character(kind=c_char), intent(in) :: message(*)
     end subroutine c_set_error
     integer(c_size_t) function c_strlen(s) bind(C, name="strlen")
       import :: c_size_t, c_ptr
       type(c_ptr), value :: s
     end function c_strlen
  end interface

contains

  !> Create a coupler from the YAML config `config` on the communicator `comm` (the integer
  !> handle of Fortran MPI, e.g. MPI_COMM_WORLD). Collective.
  integer(c_int) function ns_create(config, comm, handle) result(ierr)
    character(*), intent(in) :: config
    integer, intent(in) :: comm
    integer(c_int), intent(out) :: handle
    ierr = c_create(trim(config) // c_null_char, int(comm, c_int), handle)
  end function ns_create

  !> Attach microstructure micro_ids(k) to this rank's point point_ids(k). Collective.
  integer(c_int) function ns_register(handle, point_ids, micro_ids) result(ierr)
    integer(c_int), intent(in) :: handle
    integer(c_int64_t), intent(in) :: point_ids(:), micro_ids(:)
    if (size(micro_ids) /= size(point_ids)) then
       ierr = agreed_error(handle, "ns_register: micro_ids has another size than point_ids")
       return
    end if
    ierr = c_register(handle, size(point_ids, kind=c_int64_t), point_ids, micro_ids)
  end function ns_register

  !> The stress P(2, 2, n) at F(2, 2, n) of the points point_ids(n), and where present the
  !> tangent A(2, 2, 2, 2, n), the error bound(n) (stress units) and source(n). Collective.
  integer(c_int) function ns_evaluate(handle, point_ids, F, P, A, bound, source) result(ierr)
    integer(c_int), intent(in) :: handle
    integer(c_int64_t), intent(in) :: point_ids(:)
    real(c_double), intent(in) :: F(:, :, :)
    real(c_double), intent(out) :: P(:, :, :)
    real(c_double), intent(out), optional :: A(:, :, :, :, :), bound(:)
    integer(c_int32_t), intent(out), optional :: source(:)
    integer :: n
    real(c_double), allocatable, target :: Pc(:, :, :), Ac(:, :, :, :, :), bc(:)
    integer(c_int32_t), allocatable, target :: sc(:)
    type(c_ptr) :: pa, pb, ps
    n = size(point_ids)
    if (any(shape(F) /= [2, 2, n]) .or. any(shape(P) /= [2, 2, n]) .or. &
         wrong_shape5(A, n) .or. wrong_size(n, bound=bound, source=source)) then
       ierr = agreed_error(handle, "ns_evaluate: F and P must have shape (2, 2, n), A (2, 2, " &
            // "2, 2, n), bound and source (n), n = size(point_ids)")
       return
    end if
    allocate (Pc(2, 2, n))
    pa = c_null_ptr
    pb = c_null_ptr
    ps = c_null_ptr
    if (present(A)) then
       allocate (Ac(2, 2, 2, 2, n))
       pa = c_loc(Ac)
    end if
    if (present(bound)) then
       allocate (bc(n))
       pb = c_loc(bc)
    end if
    if (present(source)) then
       allocate (sc(n))
       ps = c_loc(sc)
    end if
    ! row-major (n, 2, 2) is Fortran's (2, 2, n) with i and j swapped
    ierr = c_evaluate(handle, int(n, c_int64_t), point_ids, &
         reshape(F, [2, 2, n], order=[2, 1, 3]), Pc, pa, pb, ps)
    if (ierr /= NS_OK) return
    P = reshape(Pc, [2, 2, n], order=[2, 1, 3])
    if (present(A)) A = reshape(Ac, [2, 2, 2, 2, n], order=[4, 3, 2, 1, 5])
    if (present(bound)) bound = bc
    if (present(source)) source = sc
  end function ns_evaluate

  !> Start load step `step` (≥ 0). Collective.
  integer(c_int) function ns_begin_step(handle, step) result(ierr)
    integer(c_int), intent(in) :: handle
    integer, intent(in) :: step
    ierr = c_begin_step(handle, int(step, c_int64_t))
  end function ns_begin_step

  !> End the load step (steps_left: steps still to come, -1 unknown); its figures in report.
  !> Collective.
  integer(c_int) function ns_end_step(handle, steps_left, report) result(ierr)
    integer(c_int), intent(in) :: handle
    integer, intent(in) :: steps_left
    type(ns_step_report), intent(out) :: report
    ierr = c_end_step(handle, int(steps_left, c_int64_t), report)
  end function ns_end_step

  !> Write the coupler's state into the folder `path`. Collective.
  integer(c_int) function ns_checkpoint(handle, path) result(ierr)
    integer(c_int), intent(in) :: handle
    character(*), intent(in) :: path
    ierr = c_checkpoint(handle, trim(path) // c_null_char)
  end function ns_checkpoint

  !> Restore the state ns_checkpoint wrote into `path` (after ns_register). Collective.
  integer(c_int) function ns_restore(handle, path) result(ierr)
    integer(c_int), intent(in) :: handle
    character(*), intent(in) :: path
    ierr = c_restore(handle, trim(path) // c_null_char)
  end function ns_restore

  !> Close the coupler. Collective.
  integer(c_int) function ns_destroy(handle) result(ierr)
    integer(c_int), intent(in) :: handle
    ierr = c_destroy(handle)
  end function ns_destroy

  !> The message of the last error ("" if none).
  function ns_last_error() result(message)
    character(:), allocatable :: message
    character(kind=c_char), pointer :: chars(:)
    type(c_ptr) :: p
    integer :: i, n
    p = c_last_error()
    n = int(c_strlen(p))
    call c_f_pointer(p, chars, [n])
    allocate (character(n) :: message)
    do i = 1, n
       message(i:i) = chars(i)
    end do
  end function ns_last_error

  !> UMAT-style routine of one point: DFGRD1 (3, 3), the deformation gradient at the end of
  !> the increment (plane strain: DFGRD1(3, 3) = 1, no out-of-plane shear), in; the first
  !> Piola–Kirchhoff STRESS(2, 2) and DDSDDE(2, 2, 2, 2) = ∂P̄/∂F̄ out; STATEV(NS_NSTATV)
  !> updated (see NS_NSTATV). Collective like ns_evaluate: a host calling it point by point
  !> on several ranks makes the same number of calls on each, or gives each rank its own
  !> coupler (MPI_COMM_SELF). Where it can, a host calls ns_umat_batch once per element or
  !> patch: the cost of a call is mostly per call, not per point.
  subroutine ns_umat(handle, point_id, dfgrd1, stress, ddsdde, statev, ierr)
    integer(c_int), intent(in) :: handle
    integer(c_int64_t), intent(in) :: point_id
    real(c_double), intent(in) :: dfgrd1(3, 3)
    real(c_double), intent(out) :: stress(2, 2), ddsdde(2, 2, 2, 2)
    real(c_double), intent(inout) :: statev(:)
    integer(c_int), intent(out) :: ierr
    real(c_double) :: s(2, 2, 1), d(2, 2, 2, 2, 1), v(size(statev), 1)
    v(:, 1) = statev
    call ns_umat_batch(handle, [point_id], reshape(dfgrd1, [3, 3, 1]), s, d, v, ierr)
    stress = s(:, :, 1)
    ddsdde = d(:, :, :, :, 1)
    statev = v(:, 1)
  end subroutine ns_umat

  !> ns_umat for n points at once: point_ids(n), dfgrd1(3, 3, n), stress(2, 2, n),
  !> ddsdde(2, 2, 2, 2, n), statev(nstatv ≥ NS_NSTATV, n). Collective.
  subroutine ns_umat_batch(handle, point_ids, dfgrd1, stress, ddsdde, statev, ierr)
    integer(c_int), intent(in) :: handle
    integer(c_int64_t), intent(in) :: point_ids(:)
    real(c_double), intent(in) :: dfgrd1(:, :, :)
    real(c_double), intent(out) :: stress(:, :, :), ddsdde(:, :, :, :, :)
    real(c_double), intent(inout) :: statev(:, :)
    integer(c_int), intent(out) :: ierr
    real(c_double) :: bound(size(point_ids))
    integer(c_int32_t) :: source(size(point_ids))
    integer :: n
    n = size(point_ids)
    if (any(shape(dfgrd1) /= [3, 3, n]) .or. size(statev, 1) < NS_NSTATV .or. &
         size(statev, 2) /= n) then
       ierr = agreed_error(handle, "ns_umat_batch: dfgrd1 must have shape (3, 3, n), statev " &
            // "(nstatv >= NS_NSTATV, n), n = size(point_ids)")
       return
    end if
    if (any(abs(dfgrd1(3, 3, :) - 1) > 1e-12_c_double) .or. any(dfgrd1(1:2, 3, :) /= 0) .or. &
         any(dfgrd1(3, 1:2, :) /= 0)) then
       ierr = agreed_error(handle, "ns_umat_batch: dfgrd1 is not plane strain: give " &
            // "dfgrd1(3, 3) = 1 and no out-of-plane shear (the coupler is 2D)")
       return
    end if
    ierr = ns_evaluate(handle, point_ids, dfgrd1(1:2, 1:2, :), stress, ddsdde, bound, source)
    if (ierr /= NS_OK) return
    statev(1, :) = bound
    statev(2, :) = real(source, c_double)
    where (source == NS_SOURCE_FINE) statev(3, :) = statev(3, :) + 1
  end subroutine ns_umat_batch

  !> Fail the collective call on every rank (an evaluation of -1 points, which every rank
  !> refuses together), then leave `message` as this rank's error.
  integer(c_int) function agreed_error(handle, message) result(ierr)
    integer(c_int), intent(in) :: handle
    character(*), intent(in) :: message
    integer(c_int64_t) :: no_ids(1)
    real(c_double) :: no_F(1), no_P(1)
    no_ids = 0
    no_F = 0
    ierr = c_evaluate(handle, -1_c_int64_t, no_ids, no_F, no_P, c_null_ptr, c_null_ptr, &
         c_null_ptr)
    if (ierr == NS_ERR_INPUT) call c_set_error(message // c_null_char)
  end function agreed_error

  logical function wrong_shape5(A, n)
    real(c_double), intent(in), optional :: A(:, :, :, :, :)
    integer, intent(in) :: n
    wrong_shape5 = .false.
    if (present(A)) wrong_shape5 = any(shape(A) /= [2, 2, 2, 2, n])
  end function wrong_shape5

  logical function wrong_size(n, bound, source)
    integer, intent(in) :: n
    real(c_double), intent(in), optional :: bound(:)
    integer(c_int32_t), intent(in), optional :: source(:)
    wrong_size = .false.
    if (present(bound)) wrong_size = size(bound) /= n
    if (present(source)) wrong_size = wrong_size .or. size(source) /= n
  end function wrong_size

end module neuroscale
