!> A Fortran FE² host: a plane-strain bar (the unit square, n × n × 2 P1 triangles, the
!> diagonals of DOLFINx's create_rectangle), clamped at x = 0, pulled to u_x = δ·t at x = 1
!> (u_y free there), with its material answered by NeuroScale through the UMAT-style batch
!> routine: one collective call per Newton iterate with the rank's elements (one point each).
!>
!> Total Lagrangian, weak form Σ_e |T_e| P̄(F̄_e) : ∇N_a = 0 at the free dofs, F̄_e = I + ∇u on
!> element e (one point, its centroid, the exact rule for P1), consistent tangent
!> K_(a i)(b k) = Σ_e |T_e| ∇N_a,j A_ijkl ∇N_b,l. Each rank assembles its elements; the sums
!> go over the ranks (MPI_Allreduce) and every rank solves the same dense system. A step's
!> Newton iterates are those of DOLFINx's SNES (see solve_increment), so the two runs send the
!> same points to the fine solver.
!> Point id = element number; microstructure id = the column third of its centroid (0, 1, 2).
!>
!>   bar_fe CONFIG OUT N STEPS [CHECKPOINT [STOP_AFTER]]
!> Writes `x y u_x u_y` per node to OUT (rank 0). With CHECKPOINT and STOP_AFTER: stops after
!> that many steps, having written the coupler's state (ns_checkpoint) and u into CHECKPOINT;
!> with CHECKPOINT alone: restarts from it (ns_restore) and runs the remaining steps.
program bar_fe
  use, intrinsic :: iso_c_binding
  use mpi_c
  use neuroscale
  use demo_support
  implicit none
  real(c_double), parameter :: stretch = 0.06_c_double
  integer(c_int) :: handle, ierr
  integer :: rank, n_ranks, n, steps, n_nodes, n_dofs, n_el, n_own, step, first_step, stop_after
  integer :: e, it, unit
  integer, allocatable :: cells(:, :), own(:)
  integer(c_int64_t), allocatable :: ids(:), micro(:)
  real(c_double), allocatable :: x(:, :), u(:), g(:), r(:), Kmat(:, :), grads(:, :, :), area(:)
  real(c_double), allocatable :: dfgrd(:, :, :), stress(:, :, :), ddsdde(:, :, :, :, :), statev(:, :)
  logical, allocatable :: fixed(:)
  character(len=4096) :: config, out, ckpt, arg
  type(ns_step_report) :: report
  real(c_double) :: r0, rnorm

  call mpi_start()
  call mpi_rank_size(MPI_COMM_WORLD, rank, n_ranks)
  call get_command_argument(1, config)
  call get_command_argument(2, out)
  call get_command_argument(3, arg)
  read (arg, *) n
  call get_command_argument(4, arg)
  read (arg, *) steps
  call get_command_argument(5, ckpt)
  call get_command_argument(6, arg)
  stop_after = steps
  if (len_trim(arg) > 0) read (arg, *) stop_after

  call make_mesh()
  ! this rank's elements: e = rank, rank + size, ... (0-based element numbers are point ids)
  own = [(e, e = rank + 1, n_el, n_ranks)]
  n_own = size(own)
  allocate (ids(n_own), micro(n_own), dfgrd(3, 3, n_own), stress(2, 2, n_own), &
       ddsdde(2, 2, 2, 2, n_own), statev(NS_NSTATV, n_own))
  ids = own - 1
  do e = 1, n_own
     micro(e) = min(2, int(sum(x(1, cells(:, own(e))))))  ! 3 · centroid x
  end do
  statev = 0
  call check(ns_create(config, MPI_COMM_WORLD, handle), "ns_create")
  call check(ns_register(handle, ids, micro), "ns_register")

  first_step = 0
  if (len_trim(ckpt) > 0 .and. stop_after == steps) call restart()
  do step = first_step, min(steps, stop_after) - 1
     call check(ns_begin_step(handle, step), "ns_begin_step")
     where (fixed(1::2) .and. x(1, :) > 0.5) g(1::2) = stretch * (step + 1) / steps
     do it = 0, 25
        call assemble()
        rnorm = norm2(merge(u - g, r, fixed))
        if (it == 0) r0 = rnorm
        if (rank == 0) print '("step ", i0, " iterate ", i0, ": |r| = ", es10.3)', step, it, rnorm
        if (rnorm <= 1e-10_c_double * r0 .or. rnorm <= 1e-13_c_double) exit
        call solve_increment()
     end do
     if (it > 25) then
        print '("step ", i0, ": Newton did not converge")', step
        call mpi_stop()
        stop 1
     end if
     call check(ns_end_step(handle, steps - 1 - step, report), "ns_end_step")
     if (rank == 0) print '("step ", i0, ": ", i0, " fallback points, ", i0, " fine solves")', &
          step, report%fallback_points, report%fine_solves
     if (len_trim(ckpt) > 0) call write_checkpoint()
  end do
  if (rank == 0) then
     open (newunit=unit, file=trim(out), status="replace", action="write")
     do e = 1, n_nodes
        write (unit, '(4(es24.16e3, 1x))') x(:, e), u(2 * e - 1:2 * e)
     end do
     close (unit)
  end if
  call check(ns_destroy(handle), "ns_destroy")
  call mpi_stop()

contains

  !> Nodes (i, j) ↦ j (n + 1) + i at (i/n, j/n); square (i, j) → triangles (v0, v1, v3) and
  !> (v0, v2, v3); shape-function gradients and areas; the Dirichlet dofs.
  subroutine make_mesh()
    integer :: i, j, v0, a
    real(c_double) :: J2(2, 2), det
    n_nodes = (n + 1)**2
    n_dofs = 2 * n_nodes
    n_el = 2 * n * n
    allocate (x(2, n_nodes), u(n_dofs), g(n_dofs), r(n_dofs), Kmat(n_dofs, n_dofs), fixed(n_dofs), &
         cells(3, n_el), grads(2, 3, n_el), area(n_el))
    do j = 0, n
       do i = 0, n
          x(:, j * (n + 1) + i + 1) = [real(i, c_double), real(j, c_double)] / n
       end do
    end do
    e = 0
    do j = 0, n - 1
       do i = 0, n - 1
          v0 = j * (n + 1) + i + 1
          cells(:, e + 1) = [v0, v0 + 1, v0 + n + 2]
          cells(:, e + 2) = [v0, v0 + n + 1, v0 + n + 2]
          e = e + 2
       end do
    end do
    do e = 1, n_el  ! ∇N_a = J⁻ᵀ ∇̂N_a, ∇̂N = (-1, -1), (1, 0), (0, 1)
       J2(:, 1) = x(:, cells(2, e)) - x(:, cells(1, e))
       J2(:, 2) = x(:, cells(3, e)) - x(:, cells(1, e))
       det = J2(1, 1) * J2(2, 2) - J2(1, 2) * J2(2, 1)
       area(e) = abs(det) / 2
       grads(:, 2, e) = [J2(2, 2), -J2(1, 2)] / det
       grads(:, 3, e) = [-J2(2, 1), J2(1, 1)] / det
       grads(:, 1, e) = -grads(:, 2, e) - grads(:, 3, e)
    end do
    u = 0
    g = 0
    fixed = .false.
    do a = 1, n_nodes
       if (x(1, a) < 1e-12_c_double) fixed(2 * a - 1:2 * a) = .true.
       if (x(1, a) > 1 - 1e-12_c_double) fixed(2 * a - 1) = .true.
    end do
  end subroutine make_mesh

  !> r and K at u: F̄ of the rank's elements, one ns_umat_batch call, sums over the ranks.
  subroutine assemble()
    integer :: k, a, b, i, kk, dofs(6)
    real(c_double) :: packed(n_dofs + n_dofs * n_dofs)
    do k = 1, n_own
       e = own(k)
       dfgrd(:, :, k) = 0
       dfgrd(3, 3, k) = 1
       dfgrd(1:2, 1:2, k) = reshape([1, 0, 0, 1], [2, 2])
       do a = 1, 3
          do i = 1, 2
             dfgrd(i, 1:2, k) = dfgrd(i, 1:2, k) + u(2 * cells(a, e) - 2 + i) * grads(:, a, e)
          end do
       end do
    end do
    call ns_umat_batch(handle, ids, dfgrd, stress, ddsdde, statev, ierr)
    call check(ierr, "ns_umat_batch")
    r = 0
    Kmat = 0
    do k = 1, n_own
       e = own(k)
       dofs = [((2 * cells(a, e) - 2 + i, i = 1, 2), a = 1, 3)]
       do a = 1, 3
          do i = 1, 2
             r(dofs(2 * a - 2 + i)) = r(dofs(2 * a - 2 + i)) &
                  + area(e) * dot_product(stress(i, :, k), grads(:, a, e))
             do b = 1, 3
                do kk = 1, 2
                   Kmat(dofs(2 * a - 2 + i), dofs(2 * b - 2 + kk)) = &
                        Kmat(dofs(2 * a - 2 + i), dofs(2 * b - 2 + kk)) + area(e) &
                        * dot_product(grads(:, a, e), matmul(ddsdde(i, :, kk, :, k), grads(:, b, e)))
                end do
             end do
          end do
       end do
    end do
    packed = [r, reshape(Kmat, [n_dofs * n_dofs])]
    call mpi_sum_doubles(packed, MPI_COMM_WORLD)
    r = packed(1:n_dofs)
    Kmat = reshape(packed(n_dofs + 1:), [n_dofs, n_dofs])
  end subroutine assemble

  !> The Newton update: du = g − u at the Dirichlet dofs (the new boundary values, as in
  !> DOLFINx, enter through the update: the first iterate of a step is the last converged state)
  !> and K_ff du_f = −r_f − K_fd du_d at the free dofs (Gaussian elimination with partial
  !> pivoting; K: Kmat).
  subroutine solve_increment()
    integer, allocatable :: free(:), dirichlet(:)
    real(c_double), allocatable :: M(:, :), b(:)
    integer :: m_, i, p
    free = pack([(i, i = 1, n_dofs)], .not. fixed)
    dirichlet = pack([(i, i = 1, n_dofs)], fixed)
    m_ = size(free)
    M = Kmat(free, free)
    b = -r(free) - matmul(Kmat(free, dirichlet), g(dirichlet) - u(dirichlet))
    u(dirichlet) = g(dirichlet)
    do i = 1, m_
       p = i - 1 + maxloc(abs(M(i:, i)), dim=1)
       M([i, p], :) = M([p, i], :)
       b([i, p]) = b([p, i])
       M(i + 1:, i) = M(i + 1:, i) / M(i, i)
       M(i + 1:, i + 1:) = M(i + 1:, i + 1:) - spread(M(i + 1:, i), 2, m_ - i) &
            * spread(M(i, i + 1:), 1, m_ - i)
       b(i + 1:) = b(i + 1:) - M(i + 1:, i) * b(i)
    end do
    do i = m_, 1, -1
       b(i) = (b(i) - dot_product(M(i, i + 1:), b(i + 1:))) / M(i, i)
    end do
    u(free) = u(free) + b
  end subroutine solve_increment

  !> The coupler's state (ns_checkpoint) and u, with the number of steps done, into ckpt.
  subroutine write_checkpoint()
    call check(ns_checkpoint(handle, ckpt), "ns_checkpoint")
    if (rank == 0) then
       open (newunit=unit, file=trim(ckpt) // "/u.txt", status="replace", action="write")
       write (unit, *) step + 1
       write (unit, '(es24.16e3)') u, g
       close (unit)
    end if
  end subroutine write_checkpoint

  !> Resume from the checkpoint in ckpt: u, the next step, the coupler's state.
  subroutine restart()
    open (newunit=unit, file=trim(ckpt) // "/u.txt", status="old", action="read")
    read (unit, *) first_step
    read (unit, *) u, g
    close (unit)
    call check(ns_restore(handle, ckpt), "ns_restore")
  end subroutine restart

end program bar_fe
