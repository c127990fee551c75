"""Compiled CPU kernels (numba) for loops numpy cannot express without large temporaries.

The array code in :mod:`hetero_dask.core` runs on numpy and CuPy alike; on a
CPU worker some inner loops are memory-bound scatters that numpy can only
write as several passes over large temporaries. Here they are written once
more as fused loops, compiled by numba when it is installed (it is a
dependency; the array code stays the reference and the fallback, and tests
check the two agree):

* :func:`backproject_trilinear`: the trilinear backprojection of
  :func:`hetero_dask.core.backprojector.backproject` (8 corners of data and
  weight in one pass over the samples, no index or weight arrays). The grids
  (~105 MB per class and half-set at box 128) do not fit in cache and each
  sample lands ~2 voxels from the previous one, so the loop waits on memory:
  it prefetches the cache lines of the sample ``PREFETCH_DISTANCE`` ahead
  (2.5x faster at box 128: ``benchmarks/results/design_measurements.md``);
* :func:`backproject_images`: the same deposit of image spectra, read
  straight from the images' real FFTs, with the centring and shift phases,
  CTF, noise weights and posteriors multiplied in per sample (no
  particle-by-frequency temporaries), into an interleaved (re, im, weight)
  accumulator (see :func:`hetero_dask.jobs.mstep.accumulating`); it checks
  once per call that every sample lands inside the grid;
* :func:`shell_sums` and :func:`wiener_spectrum`: the per-shell weight sums
  and the Wiener division of :func:`hetero_dask.core.reconstruction.reconstruct`,
  fused with the Hermitian completion of the x = 0 plane and the placement
  into the band-limited spectrum the pruned inverse FFT reads (one pass over
  the grids instead of about ten grid-sized temporaries);
* :func:`deinterleave`: the interleaved accumulator split in place into the
  data and weight grids a partial carries (no new grid-sized memory);
* :func:`project_interior`: the central slices of
  :func:`hetero_dask.core.projector.project` when every trilinear corner lies inside the
  stored cube (the usual cropped map), all C stacked maps per point in one pass: no
  rotation-by-frequency coordinate, index or weight arrays (the array code makes about a
  dozen per call);

Set ``HETERO_DASK_NO_NUMBA=1`` to use the array code everywhere.
"""

from __future__ import annotations

import os

import numpy as np

try:
    if os.environ.get("HETERO_DASK_NO_NUMBA"):
        raise ImportError("disabled by HETERO_DASK_NO_NUMBA")
    import numba
except ImportError:  # pragma: no cover - exercised by the fallback tests via ENABLED
    numba = None

ENABLED = numba is not None
PREFETCH_DISTANCE = 32  # samples ahead: 16 / 32 / 64 gave 0.34 / 0.28 / 0.31 ms per particle (6 grids)


def enabled() -> bool:
    """True when the compiled kernels are available and not switched off."""
    return ENABLED


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)


if numba is not None:
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    # Opaque pointers from LLVM 15 on: the intrinsic's name carries the pointer type.
    _PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"

    @_intrinsic
    def _prefetch(typingctx, arr, idx):
        """Hint the CPU to fetch ``arr[idx]``'s cache line for writing (no fault if outside)."""

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
            fn = _cgutils.get_or_insert_function(
                builder.module, _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH
            )
            # rw = 1 (write), locality = 3 (keep in all levels), cache type = 1 (data)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
            return context.get_dummy_value()

        return numba.types.void(arr, idx), codegen
else:  # pragma: no cover

    def _prefetch(arr, idx):
        pass


@_jit
def _point(a0, a1, b0, b1, c0, c1, kx, ky, pad):
    """Padded-grid point ``pad * R @ (kx, ky, 0)``, folded to x >= 0; True if folded."""
    x = (a0 * kx + a1 * ky) * pad
    y = (b0 * kx + b1 * ky) * pad
    z = (c0 * kx + c1 * ky) * pad
    if x < 0:
        return -x, -y, -z, True
    return x, y, z, False


@_jit
def _corner(x, y, z, h, S, X):
    """Flat index of the lower trilinear corner of ``(x, y, z)`` and the fractional offsets."""
    fx = np.floor(x)
    fy = np.floor(y)
    fz = np.floor(z)
    ix = int(fx)
    iy = int(fy) + h
    iz = int(fz) + h
    if ix < 0 or ix >= h or iy < 0 or iy >= 2 * h or iz < 0 or iz >= 2 * h:
        raise IndexError("backprojection sample outside the half-grid")
    return (iz * S + iy) * X + ix, x - fx, y - fy, z - fz


@_jit
def _lower_corner(a0, a1, b0, b1, c0, c1, kx, ky, pad, h, S, X):
    """Flat lower-corner index of a sample, unchecked (for prefetching)."""
    x, y, z, _ = _point(a0, a1, b0, b1, c0, c1, kx, ky, pad)
    return ((int(np.floor(z)) + h) * S + int(np.floor(y)) + h) * X + int(np.floor(x))


@_jit
def _prefetch_sample(data, weight, a0, a1, b0, b1, c0, c1, kx, ky, pad, h, S, X):
    base = _lower_corner(a0, a1, b0, b1, c0, c1, kx, ky, pad, h, S, X)
    for o in (0, X, S * X, S * X + X):
        _prefetch(data, base + o)
        _prefetch(data, base + o + 1)
        _prefetch(weight, base + o)
        _prefetch(weight, base + o + 1)


@_jit
def _deposit(data, weight, a0, a1, b0, b1, c0, c1, kx, ky, v, w, pad, h, S, X):
    """Trilinear deposit of value ``v`` and weight ``w`` at ``pad * R @ (kx, ky, 0)``."""
    one = np.float32(1)
    x, y, z, folded = _point(a0, a1, b0, b1, c0, c1, kx, ky, pad)
    if folded:
        v = v.conjugate()
    base, tx, ty, tz = _corner(x, y, z, h, S, X)
    for dz in range(2):
        wz = tz if dz else one - tz
        for dy in range(2):
            wzy = wz * (ty if dy else one - ty)
            row = base + dz * S * X + dy * X
            w0 = wzy * (one - tx)
            w1 = wzy * tx
            data[row] += w0 * v
            data[row + 1] += w1 * v
            weight[row] += w0 * w
            weight[row + 1] += w1 * w


@_jit
def _backproject_kernel(data, weight, rot, kx, ky, values, weights, pad, h, S, X, ahead):
    P, M = values.shape
    for p in range(P):
        a0, a1 = rot[p, 0, 0], rot[p, 0, 1]
        b0, b1 = rot[p, 1, 0], rot[p, 1, 1]
        c0, c1 = rot[p, 2, 0], rot[p, 2, 1]
        for m in range(M):
            if m + ahead < M:
                _prefetch_sample(data, weight, a0, a1, b0, b1, c0, c1, kx[m + ahead], ky[m + ahead], pad, h, S, X)
            _deposit(data, weight, a0, a1, b0, b1, c0, c1, kx[m], ky[m], values[p, m], weights[p, m], pad, h, S, X)


@_jit
def _shift_phases(ex, ey, shift_x, shift_y, n):
    """``ex[j]``, ``ey[j]`` = exp(-2 pi i (s - n/2) k / n), k = j - n/2, for the shift ``s`` on
    each axis: the shift and the centring of the uncentred FFT (origin at pixel n/2), in double
    precision (|(s - n/2) k| ~ n^2 / 4)."""
    o = n // 2
    sx = np.float64(shift_x) - o
    sy = np.float64(shift_y) - o
    for j in range(n):
        ex[j] = np.complex64(np.exp((-2j * np.pi / n) * (sx * (j - o))))
        ey[j] = np.complex64(np.exp((-2j * np.pi / n) * (sy * (j - o))))


@_jit
def _prefetch_cell(acc, b, row, plane):
    """Prefetch the 4 rows of the trilinear cell whose lower corner starts at ``acc[b]``
    (interleaved real, imaginary, weight: 6 values, 2 cache lines at most, per row)."""
    for q in (b, b + 3 * row, b + 3 * plane, b + 3 * (plane + row)):
        _prefetch(acc, q)
        _prefetch(acc, q + 5)


@_jit
def _backproject_images_kernel(acc, rot, kx, ky, F, idx, a, c, rows, shifts, w, n, pad, h, S, X, ahead):
    # One flat loop (helpers returning tuples, and a per-sample bounds check, were slower; the
    # prefetch matters most: benchmarks/results/design_measurements.md). The fold to x >= 0 multiplies by
    # s = +-1 instead of branching (a coin toss per sample); the caller has checked that every
    # sample lands inside the grid.
    P = rows.shape[0]
    M = kx.shape[0]
    o = n // 2
    one = np.float32(1.0)
    row, plane = X, S * X
    ex = np.empty(n, np.complex64)
    ey = np.empty(n, np.complex64)
    for p in range(P):
        r = rows[p]
        p0, p1 = rot[p, 0, 0] * pad, rot[p, 0, 1] * pad  # rows of the pad-scaled rotation
        q0, q1 = rot[p, 1, 0] * pad, rot[p, 1, 1] * pad
        r0, r1 = rot[p, 2, 0] * pad, rot[p, 2, 1] * pad
        _shift_phases(ex, ey, shifts[p, 0], shifts[p, 1], n)
        wp = w[p]
        for m in range(M):
            if m + ahead < M:  # the 4 corner rows of the sample `ahead` on, 2 lines each
                fx, fy = kx[m + ahead], ky[m + ahead]
                x = p0 * fx + p1 * fy
                s = one if x >= 0 else -one
                y = (q0 * fx + q1 * fy) * s
                z = (r0 * fx + r1 * fy) * s
                b = 3 * (((int(np.floor(z)) + h) * S + int(np.floor(y)) + h) * X + int(x * s))
                _prefetch_cell(acc, b, row, plane)
            fx, fy = kx[m], ky[m]
            am = wp * a[r, m]
            v = ex[int(fx) + o] * ey[int(fy) + o] * F[r, idx[m]] * am
            wt = am * c[r, m]
            x = p0 * fx + p1 * fy
            s = one if x >= 0 else -one  # folded: the conjugate
            x = x * s
            y = (q0 * fx + q1 * fy) * s
            z = (r0 * fx + r1 * fy) * s
            vr = v.real
            vi = v.imag * s
            gx = np.floor(x)
            gy = np.floor(y)
            gz = np.floor(z)
            tx = x - gx
            ty = y - gy
            tz = z - gz
            b = ((int(gz) + h) * S + int(gy) + h) * X + int(gx)
            for dz in range(2):
                wz = tz if dz else one - tz
                for dy in range(2):
                    wzy = wz * (ty if dy else one - ty)
                    q = (b + dz * plane + dy * row) * 3
                    w0 = wzy * (one - tx)
                    w1 = wzy * tx
                    acc[q] += w0 * vr
                    acc[q + 1] += w0 * vi
                    acc[q + 2] += w0 * wt
                    acc[q + 3] += w1 * vr
                    acc[q + 4] += w1 * vi
                    acc[q + 5] += w1 * wt


def backproject_trilinear(data, weight, rotations, kx, ky, values, weights, pad: int, h: int) -> None:
    """Add ``values`` / ``weights`` ``(P, M)`` at ``pad * R @ (kx, ky, 0)`` into half-grids, in place.

    ``data`` complex64 and ``weight`` float32: the half-grids ``(2h+1, 2h+1, h+1)``
    of :class:`hetero_dask.core.backprojector.BackprojGrids`, C-contiguous or as
    their 1-D views (written through);
    frequencies must lie within the grids' radius (checked: IndexError).
    Same arithmetic as the array path, in float32.
    """
    S, X = 2 * h + 1, h + 1
    _backproject_kernel(
        data.reshape(-1),
        weight.reshape(-1),
        np.ascontiguousarray(rotations, dtype=np.float32),
        np.ascontiguousarray(kx, dtype=np.float32),
        np.ascontiguousarray(ky, dtype=np.float32),
        np.ascontiguousarray(values, dtype=np.complex64),
        np.ascontiguousarray(weights, dtype=np.float32),
        np.float32(pad),
        h,
        S,
        X,
        PREFETCH_DISTANCE,
    )


@_jit
def _shell_sums_kernel(values, shell, n_out):
    out = np.zeros(n_out, np.float64)
    for i in range(values.size):
        out[shell[i]] += values[i]
    return out


def shell_sums(values, shell, n_out: int):
    """``np.bincount(shell, weights=values, minlength=n_out)`` in float64 for flat float32
    ``values`` and small unsigned ``shell`` indices (all ``< n_out``), without casting them."""
    return _shell_sums_kernel(values.reshape(-1), shell.reshape(-1), n_out)


@_jit
def _wiener_kernel(B, W, shell, reg, floor, h, he, D, spec):
    c = 2 * h
    for iz in range(h - he, h + he + 1):
        zd = (iz - h) % D
        for iy in range(h - he, h + he + 1):
            yd = iy - (h - he)
            for x in range(he + 1):
                b = B[iz, iy, x]
                w = W[iz, iy, x]
                if x == 0:  # Hermitian completion: H(y, z) + conj(H(-y, -z))
                    b = b + B[c - iz, c - iy, 0].conjugate()
                    w = w + W[c - iz, c - iy, 0]
                s = shell[iz, iy, x]
                d = max(w + reg[s], floor[s])  # floor inf outside r_max or where there is no data
                spec[zd, yd, x] = np.complex64(complex(b.real / d, b.imag / d))


def wiener_spectrum(B, W, shell, reg, floor, D: int):
    """``B / max(W + reg[shell], floor[shell])`` of half-grids ``(2h+1, 2h+1, h+1)``, x = 0
    plane completed, as the band-limited spectrum of
    :func:`hetero_dask.core.reconstruction._spectrum_to_volume`: a new
    ``(D, 2 he + 1, he + 1)`` complex64 array, z uncentred, y centred.

    ``B`` complex64, ``W`` float32, ``shell`` per-voxel indices into ``reg`` and
    ``floor`` (float32, ``floor`` inf for voxels to leave at zero); frequencies
    beyond ``he = min(h, (D - 1) // 2)`` are dropped.
    """
    h = B.shape[-1] - 1
    he = min(h, (D - 1) // 2)
    spec = np.zeros((D, 2 * he + 1, he + 1), np.complex64)
    _wiener_kernel(B, W, shell, np.asarray(reg, np.float32), np.asarray(floor, np.float32), h, he, D, spec)
    return spec


@_jit
def _deinterleave_kernel(flat, tmp):
    n = tmp.size
    for i in range(n):  # writes at 2i, 2i + 1 never reach a triple not yet read (3j, j >= i)
        re = flat[3 * i]
        im = flat[3 * i + 1]
        tmp[i] = flat[3 * i + 2]
        flat[2 * i] = re
        flat[2 * i + 1] = im
    for i in range(n):
        flat[2 * n + i] = tmp[i]


def deinterleave(acc):
    """Split an interleaved ``(..., 3)`` float32 accumulator in place into its data and weight.

    Returns ``(data, weight)``: a complex64 ``(...)`` array and a float32 ``(...)``
    array, both contiguous views of ``acc``'s memory (which is overwritten): the
    first two thirds hold ``re + i im``, the last third the weights. No grid-sized
    allocation (only a weight-sized scratch): on a worker, fresh memory is slow to fault in.
    """
    if acc.dtype != np.float32 or acc.shape[-1] != 3 or not acc.flags.c_contiguous:
        raise ValueError("deinterleave needs a C-contiguous float32 (..., 3) accumulator")
    shape = acc.shape[:-1]
    flat = acc.reshape(-1)
    n = flat.size // 3
    _deinterleave_kernel(flat, np.empty(n, np.float32))
    return flat[: 2 * n].view(np.complex64).reshape(shape), flat[2 * n :].reshape(shape)


def _check_inside(rotations, kx, ky, pad: int, h: int) -> None:
    """The kernel does not check each sample: check here, once per call, that every sample
    lands with its trilinear corners inside the half-grid. Rotations keep lengths, so the
    largest ``pad * |k|`` with the rotations' largest column length bounds every point."""
    if kx.size == 0 or rotations.shape[0] == 0:
        return
    radius = float(np.sqrt(np.max(kx.astype(np.float64) ** 2 + ky.astype(np.float64) ** 2)))
    cols = np.sqrt(np.sum(rotations[..., :2].astype(np.float64) ** 2, axis=-2))
    reach = pad * radius * float(np.max(cols))
    if not np.isfinite(reach) or reach >= h - 1e-3:
        raise ValueError(
            f"backprojection samples reach {reach:.2f} padded-grid voxels, outside a half-grid of "
            f"half-width {h} (frequencies up to {radius:.1f}, pad {pad}, rotation columns up to "
            f"{float(np.max(cols)):.4f} long)"
        )


def backproject_images(acc, rotations, kx, ky, F, a, c, rows, shifts_px, w, n: int, pad: int):
    """:func:`backproject_trilinear` of image spectra into an interleaved grid, products fused in.

    ``acc``: float32 ``(2h+1, 2h+1, h+1, 3)``, C-contiguous: per voxel the real and
    imaginary parts of the data grid and the weight (one cache line holds the data
    and weight of a corner pair: faster than separate grids, ``benchmarks/results/design_measurements.md``).
    ``F`` ``(B, n, n // 2 + 1)`` complex64: the images' real FFTs as they come (origin
    at pixel 0); the kernel reads the samples at integer frequencies ``kx`` (>= 0),
    ``ky`` ``(M,)`` and centres them (origin at pixel ``n // 2``) with the shift's phase.
    Particle ``p`` (image row ``rows[p]``) deposits
    ``w[p] * a * Y * exp(-2 pi i (sx kx + sy ky) / n)`` as value and ``w[p] * a * c``
    as weight, ``Y`` its centred spectrum, with ``a``, ``c`` ``(B, M)`` float32
    (``CTF / sigma2`` and ``CTF``) and ``shifts_px`` ``(P, 2)`` (the image's shift in
    pixels at box ``n``); no ``(P, M)`` temporaries, no gathered copy of the spectra.
    """
    if acc.dtype != np.float32 or acc.shape[-1] != 3 or not acc.flags.c_contiguous:
        raise ValueError("backproject_images needs a C-contiguous float32 (..., 3) accumulator")
    if F.ndim != 3 or F.shape[1:] != (n, n // 2 + 1):
        raise ValueError(f"backproject_images needs real FFTs (B, {n}, {n // 2 + 1}), got {F.shape}")
    h = acc.shape[-2] - 1
    rotations = np.ascontiguousarray(rotations, dtype=np.float32)
    kx = np.ascontiguousarray(kx, dtype=np.float32)
    ky = np.ascontiguousarray(ky, dtype=np.float32)
    _check_inside(rotations, kx, ky, pad, h)
    if kx.size and (kx.min() < 0 or kx.max() > n // 2 or np.abs(ky).max() > n // 2):
        raise ValueError(f"backproject_images: frequencies outside a real FFT of box {n}")
    idx = (ky.astype(np.int64) % n) * (n // 2 + 1) + kx.astype(np.int64)
    _backproject_images_kernel(
        acc.reshape(-1),
        rotations,
        kx,
        ky,
        np.ascontiguousarray(F, dtype=np.complex64).reshape(F.shape[0], -1),
        idx,
        np.ascontiguousarray(a, dtype=np.float32),
        np.ascontiguousarray(c, dtype=np.float32),
        np.ascontiguousarray(rows, dtype=np.int64),
        np.ascontiguousarray(shifts_px, dtype=np.float32),
        np.ascontiguousarray(w, dtype=np.float32),
        int(n),
        np.float32(pad),
        h,
        2 * h + 1,
        h + 1,
        PREFETCH_DISTANCE,
    )


@_jit
def _project_kernel(flat, rot, kx, ky, inside, pad, center, S, out, ahead):
    C = flat.shape[0]
    R, M = rot.shape[0], kx.shape[0]
    SS = S * S
    one = np.float32(1)
    for r in range(R):
        a0, a1 = rot[r, 0, 0], rot[r, 0, 1]
        b0, b1 = rot[r, 1, 0], rot[r, 1, 1]
        c0, c1 = rot[r, 2, 0], rot[r, 2, 1]
        for m in range(M):
            if m + ahead < M:  # the corners' cache lines of the point ``ahead``
                qx, qy = kx[m + ahead] * pad, ky[m + ahead] * pad
                q = (int(c0 * qx + c1 * qy + center) * S + int(b0 * qx + b1 * qy + center)) * S + int(
                    a0 * qx + a1 * qy + center)
                for c in range(C):
                    _prefetch(flat[c], q)
                    _prefetch(flat[c], q + S)
                    _prefetch(flat[c], q + SS)
                    _prefetch(flat[c], q + SS + S)
            if inside[m] == 0:
                for c in range(C):
                    out[c, r, m] = 0
                continue
            sx, sy = kx[m] * pad, ky[m] * pad
            # the array code's float32 steps: R[:, a, 0] * sx + R[:, a, 1] * sy + center
            x = a0 * sx + a1 * sy + center
            y = b0 * sx + b1 * sy + center
            z = c0 * sx + c1 * sy + center
            fx, fy, fz = np.floor(x), np.floor(y), np.floor(z)
            tx, ty, tz = x - fx, y - fy, z - fz
            i = (int(fz) * S + int(fy)) * S + int(fx)
            wx0 = one - tx
            w00 = (one - tz) * (one - ty)
            w01 = (one - tz) * ty
            w10 = tz * (one - ty)
            w11 = tz * ty
            for c in range(C):
                f = flat[c]
                v = f[i] * (wx0 * w00) + f[i + 1] * (tx * w00)
                v = v + (f[i + S] * (wx0 * w01) + f[i + S + 1] * (tx * w01))
                v = v + (f[i + SS] * (wx0 * w10) + f[i + SS + 1] * (tx * w10))
                v = v + (f[i + SS + S] * (wx0 * w11) + f[i + SS + S + 1] * (tx * w11))
                out[c, r, m] = v


def project_interior(data, rotations, kx, ky, inside, pad: int, center: int):
    """Trilinear central slices ``(C, R, M)`` complex64 of the maps ``data`` ``(C, S, S, S)``
    at ``pad * R @ (kx, ky, 0) + center`` for every frequency with ``inside`` (M,) 1, 0 where
    it is 0; every corner of an inside point must lie in the cube (the caller checks).
    Same float32 arithmetic as :func:`hetero_dask.core.projector.project`'s array code."""
    S = data.shape[-1]
    flat = np.ascontiguousarray(data, dtype=np.complex64).reshape(-1, S**3)
    rot = np.ascontiguousarray(rotations, dtype=np.float32)
    out = np.empty((flat.shape[0], rot.shape[0], kx.shape[0]), dtype=np.complex64)
    _project_kernel(flat, rot, np.ascontiguousarray(kx, dtype=np.float32), np.ascontiguousarray(ky, dtype=np.float32),
                    np.ascontiguousarray(inside, dtype=np.float32), np.float32(pad), np.float32(center), S, out, PREFETCH_DISTANCE)
    return out
