"""The C nanoBragg program's random numbers, reproduced bit for bit with explicit state.

The C program draws every random number from Numerical Recipes' ``ran1`` (a Park-Miller
"minimal standard" generator, 16807 * idum mod (2**31 - 1), behind a 32-entry Bays-Durham
shuffle table) and builds Gaussian deviates (``gaussdev``), Poisson deviates (``poidev``),
random unit vectors (``uniform3Ddev``) and random rotations (``mosaic_rotation_umat``) from it.
Single-precision C variables are rounded to float32 here at the same points, so every value
matches the C program on the same C library.

State is a :class:`CRandom` value created by the caller and passed explicitly. In C the
shuffle table (``iy``, ``iv``) and the Gaussian spare deviate are ``static`` and so shared by
all seeds; a :class:`CRandom` carries its own copy. The C code reloads the table whenever the
seed it is given is <= 0 (or the table is still empty, and then a positive seed becomes 1),
which is what happens for every seed the C program uses by default. A positive internal
seed (a negative flag such as ``-seed -5``) instead continues the table left by the previous
generator of the run (misset, then mosaic, then noise); to reproduce that, pass
``CRandom(5, previous.iy, list(previous.iv))`` where an int seed is accepted.

Seeds: functions here take the C *internal* seed value (``idum``). The C command line stores
``-atoi(flag)`` (``-seed 2468`` gives ``idum = -2468``); :func:`seed_from_flag` performs that
conversion. Default internal seeds in C: mosaic -12345678, noise and misset ``-time()``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from functools import partial

import numpy as np

IA = 16807
IM = 2147483647
AM = 1.0 / IM
IQ = 127773
IR = 2836
NTAB = 32
NDIV = 1 + (IM - 1) // NTAB
EPS = 1.2e-7
RNMX = 1.0 - EPS

DEFAULT_MOSAIC_SEED = -12345678

_F32 = struct.Struct("f")
_pack = _F32.pack
_unpack = _F32.unpack


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (as a C ``float`` assignment does).

    Values beyond the float32 range become +-inf, as in C.
    """
    try:
        return _unpack(_pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


_RNMX_F32 = f32(RNMX)


@dataclass
class CRandom:
    """Mutable state of the C generator: ``idum`` plus the shuffle table and Gaussian spare.

    Attributes:
        idum: the C ``long *idum`` value (internal seed; <= 0 reloads the shuffle table).
        iy: last shuffle output (0 means "table not loaded yet", as C's ``static long iy=0``).
        iv: the 32-entry shuffle table.
        gauss_spare: the second Box-Muller deviate kept by ``gaussdev`` (C's ``gset`` when
            ``iset == 1``), or None.

    Example:
        >>> rng = CRandom(-12345678)
        >>> round(ran1(rng), 6)
        0.765989
    """

    idum: int
    iy: int = 0
    iv: list = field(default_factory=lambda: [0] * NTAB)
    gauss_spare: float | None = None

    def copy(self) -> "CRandom":
        """Return an independent copy of this state."""
        return CRandom(self.idum, self.iy, list(self.iv), self.gauss_spare)


def seed_from_flag(value: int | str) -> int:
    """Internal seed for a command-line seed flag: C's ``-atoi(arg)``.

    Args:
        value: the flag's integer, or its text (parsed like C ``atoi``: leading blanks, an
            optional sign, then digits; anything else stops the number, no digits gives 0).

    Returns:
        ``-value`` (e.g. ``-seed 2468`` -> ``-2468``).
    """
    if isinstance(value, str):
        text = value.lstrip(" \t\n\r\f\v")
        sign, digits = 1, ""
        if text[:1] in "+-" and text[:1]:
            sign = -1 if text[0] == "-" else 1
            text = text[1:]
        for ch in text:
            if ch not in "0123456789":
                break
            digits += ch
        value = sign * int(digits) if digits else 0
    return -int(value)


def _load_table(rng: CRandom) -> None:
    """Reload the shuffle table the way C's ran1 does when ``idum <= 0`` or ``iy == 0``."""
    idum = 1 if -rng.idum < 1 else -rng.idum
    iv = rng.iv
    for j in range(NTAB + 7, -1, -1):
        k = idum // IQ
        idum = IA * (idum - k * IQ) - IR * k
        if idum < 0:
            idum += IM
        if j < NTAB:
            iv[j] = idum
    rng.idum = idum
    rng.iy = iv[0]


def ran1(rng: CRandom) -> float:
    """Uniform deviate in (0, 1) exactly as C's ``float ran1(long *idum)``; advances ``rng``.

    Returns:
        float32 value (as a Python float), at most ``float32(1 - 1.2e-7)``.
    """
    if rng.idum <= 0 or not rng.iy:
        _load_table(rng)
    k = rng.idum // IQ
    idum = IA * (rng.idum - k * IQ) - IR * k
    if idum < 0:
        idum += IM
    rng.idum = idum
    j = rng.iy // NDIV
    rng.iy = rng.iv[j]
    rng.iv[j] = idum
    temp = f32(AM * rng.iy)
    return _RNMX_F32 if temp > RNMX else temp


def ran1_block(rng: CRandom, n: int) -> list:
    """The next ``n`` values of :func:`ran1` as a list of floats; advances ``rng`` by ``n`` draws.

    Same values as ``n`` calls of :func:`ran1`, faster: the multiplicative generator is jumped
    ahead with numpy (``idum_k = idum_0 * 16807**k mod (2**31 - 1)``) and only the shuffle runs
    as a Python loop.
    """
    out: list = []
    while n > 0:
        m = min(n, _BLOCK)
        out.extend(_ran1_chunk(rng, m))
        n -= m
    return out


def _lcg_powers(n: int) -> np.ndarray:
    """``16807**k mod (2**31 - 1)`` for k = 1..n, int64, shape (n,)."""
    p = np.empty(n, dtype=np.int64)
    acc = 1
    for k in range(n):
        acc = acc * IA % IM
        p[k] = acc
    p.flags.writeable = False
    return p


_BLOCK = 4096
_POWERS = _lcg_powers(_BLOCK)


def _ran1_chunk(rng: CRandom, n: int) -> list:
    """Up to ``_BLOCK`` ran1 values (see :func:`ran1_block`)."""
    if n <= 0:
        return []
    if rng.idum <= 0 or not rng.iy:
        _load_table(rng)
    if rng.idum >= IM:  # outside the generator's range: Schrage's step is not a plain modulo
        return [ran1(rng) for _ in range(n)]
    idums = ((rng.idum * _POWERS[:n]) % IM).tolist()
    iv = rng.iv
    iy = rng.iy
    outs = [0] * n
    for i, d in enumerate(idums):
        j = iy // NDIV
        iy = iv[j]
        iv[j] = d
        outs[i] = iy
    rng.idum = idums[-1]
    rng.iy = iy
    vals = (np.asarray(outs, dtype=np.float64) * AM).astype(np.float32).astype(np.float64)
    return np.where(vals > RNMX, _RNMX_F32, vals).tolist()


def gaussdev(rng: CRandom) -> float:
    """Normal deviate (mean 0, rms 1) by polar Box-Muller, as C's ``gaussdev``; float32 value.

    Deviates come in pairs: the first call draws two and keeps one in ``rng.gauss_spare``.
    """
    return _gaussdev(partial(ran1, rng), rng)


def _gaussdev(draw, rng: CRandom) -> float:
    """:func:`gaussdev` taking uniforms from ``draw()``; only ``rng.gauss_spare`` is used."""
    if rng.gauss_spare is not None:
        spare, rng.gauss_spare = rng.gauss_spare, None
        return spare
    while True:
        v1 = f32(2.0 * draw() - 1.0)
        v2 = f32(2.0 * draw() - 1.0)
        rsq = f32(f32(v1 * v1) + f32(v2 * v2))
        if not (rsq >= 1.0 or rsq == 0):
            break
    fac = f32(math.sqrt(-2.0 * math.log(rsq) / rsq))
    rng.gauss_spare = f32(v1 * fac)
    return f32(v2 * fac)


_GAMMLN_COF = (
    76.18009172947146,
    -86.50532032941677,
    24.01409824083091,
    -1.231739572450155,
    0.1208650973866179e-2,
    -0.5395239384953e-5,
)


def gammln(xx: float) -> float:
    """ln Gamma(xx) by Lanczos' series as C's ``float gammln(float xx)`` (float32 in and out).

    Example:
        >>> gammln(13.0)  # ln(12!) = 19.98721
        19.987215042114258
    """
    try:
        x = _unpack(_pack(xx))[0]
    except OverflowError:
        x = math.inf
    try:
        return _unpack(_pack(_gammln_series(x)))[0]
    except ZeroDivisionError:
        return math.inf  # C: log(ser / 0) = inf
    except ValueError:
        return math.nan  # C: log of a negative number


def _gammln_series(x: float) -> float:
    """The double-precision body of gammln for a float32-valued ``x`` (Lanczos, 6 terms)."""
    tmp = x + 5.5
    tmp -= (x + 0.5) * math.log(tmp)
    c0, c1, c2, c3, c4, c5 = _GAMMLN_COF
    ser = 1.000000000190015 + c0 / (x + 1.0)
    ser += c1 / (x + 2.0)
    ser += c2 / (x + 3.0)
    ser += c3 / (x + 4.0)
    ser += c4 / (x + 5.0)
    ser += c5 / (x + 6.0)
    return -tmp + math.log(2.5066282746310005 * ser / x)


def poidev(xm: float, rng: CRandom) -> float:
    """Poisson deviate with mean ``xm`` exactly as C's ``float poidev(float xm, long *idum)``.

    Means below 12 multiply uniform deviates until the product drops to exp(-xm) or below;
    means up to 1e6 use Lorentzian rejection; above 1e6 the value is
    ``xm + sqrt(xm) * gaussdev`` (a float32, not rounded to an integer). ``xm`` is rounded to
    float32 first, and every C ``float`` intermediate is float32.
    """
    return _poidev(f32(xm), partial(ran1, rng), rng, {})


def _poidev(xm: float, draw, rng: CRandom, lngamma: dict) -> float:
    """:func:`poidev` for a float32-valued ``xm`` taking uniforms from ``draw()``.

    ``rng`` only holds the Gaussian spare; ``lngamma`` memoises gammln values.
    """
    if xm > 1.0e6:
        return f32(xm + math.sqrt(xm) * _gaussdev(draw, rng))
    if xm < 12.0:
        if xm <= 0.0:  # exp(-xm) >= 1 exceeds every uniform: one draw, zero photons
            draw()
            return 0.0
        g = f32(math.exp(-xm))
        em = -1.0
        t = 1.0
        while True:
            em += 1.0
            t = _unpack(_pack(t * draw()))[0]
            if not t > g:
                return em
    return _poidev_rejection(xm, draw, lngamma)


def _poidev_rejection(xm: float, draw, lngamma: dict) -> float:
    """poidev's Lorentzian rejection branch (12 <= xm <= 1e6); values stay in float32 range.

    ``lngamma`` memoises :func:`gammln` by argument for the caller (it may be shared between
    calls: gammln is a pure function).
    """
    pack, unpack, tan, exp, pi = _pack, _unpack, math.tan, math.exp, math.pi
    sq = unpack(pack(math.sqrt(2.0 * xm)))[0]
    alxm = unpack(pack(math.log(xm)))[0]
    a = xm + 1.0
    gl = lngamma.get(a)
    if gl is None:
        gl = lngamma[a] = gammln(a)
    g = unpack(pack(unpack(pack(xm * alxm))[0] - gl))[0]
    while True:
        while True:
            y = unpack(pack(tan(pi * draw())))[0]
            em = unpack(pack(unpack(pack(sq * y))[0] + xm))[0]
            if not em < 0.0:
                break
        em = float(math.floor(em)) if em == em else em
        a = em + 1.0
        gl = lngamma.get(a)
        if gl is None:
            gl = lngamma[a] = gammln(a)
        arg = unpack(pack(unpack(pack(em * alxm))[0] - gl))[0]
        arg = unpack(pack(arg - g))[0]
        t = unpack(pack(0.9 * (1.0 + unpack(pack(y * y))[0]) * exp(arg)))[0]
        if not draw() > t:
            return em


def uniform3Ddev(rng: CRandom) -> tuple:
    """Random unit vector by rejection from a cube, as C's ``uniform3Ddev``.

    Returns:
        (dx, dy, dz, dr): float32 unit-vector components and the accepted radius dr in
        [0.01, 1] (the C return value).
    """
    dr = 0.0
    while dr > 1 or dr < 1e-2:
        dx = f32(2.1 * (ran1(rng) - 0.5))
        dy = f32(2.1 * (ran1(rng) - 0.5))
        dz = f32(2.1 * (ran1(rng) - 0.5))
        dr = f32(math.sqrt(f32(f32(f32(dx * dx) + f32(dy * dy)) + f32(dz * dz))))
    return f32(dx / dr), f32(dy / dr), f32(dz / dr), dr


def _powf(x: float, y: float) -> float:
    """C ``powf`` on float32 arguments (numpy's scalar float32 power calls the C library)."""
    return float(np.float32(x) ** np.float32(y))


def mosaic_rotation_umat(mosaicity: float, rng: CRandom) -> np.ndarray:
    """Random rotation on a spherical cap of angular diameter ``mosaicity`` (radians).

    C's ``mosaic_rotation_umat``: a random axis (uniform on the sphere) and an angle
    ``mosaicity * (1 - r3**2)**(1/3)`` computed in float32 with ``powf``. The C program
    passes ``mosaicity = 90`` (radians) for ``-misset random``, which covers the whole sphere.

    Returns:
        (3, 3) float64 rotation matrix, row-major as C's ``umat[9]`` (``newv = U @ v``).
    """
    r1 = 2.0 * ran1(rng) - 1.0
    r2 = 2.0 * ran1(rng) - 1.0
    r3 = 2.0 * ran1(rng) - 1.0
    xyrad = math.sqrt(1.0 - r2 * r2)
    rot = f32(f32(mosaicity) * _powf(f32(1.0 - r3 * r3), f32(1.0 / 3.0)))
    v1 = xyrad * math.sin(math.pi * r1)
    v2 = xyrad * math.cos(math.pi * r1)
    v3 = r2
    c, s = math.cos(rot), math.sin(rot)
    t2 = 1.0 - c
    t6 = t2 * v1
    t7 = t6 * v2
    t11 = t6 * v3
    t19 = t2 * v2 * v3
    return np.array(
        [
            [c + t2 * (v1 * v1), t7 - s * v3, t11 + s * v2],
            [t7 + s * v3, c + t2 * (v2 * v2), t19 - s * v1],
            [t11 - s * v2, t19 + s * v1, c + t2 * (v3 * v3)],
        ],
        dtype=np.float64,
    )


def _unit(v: list) -> list:
    """``v / |v|`` for a 3-list, or ``v`` unchanged when its length is 0."""
    m = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    return [v[0] / m, v[1] / m, v[2] / m] if m > 0 else v


def _cross(a: list, b: list) -> list:
    """Cross product of two 3-lists, in C's operation order."""
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def umat2misset(umat: np.ndarray) -> tuple:
    """Missetting angles (rotx, roty, rotz) in radians of a (3, 3) row-major rotation matrix.

    C's ``umat2misset``: rows are normalised, any all-zero row is rebuilt from the cross
    product of the other two, rows are normalised again, then
    ``rotx = atan2(uzy, uzz)``, ``roty = atan2(-uzx, hypot(uzy, uzz))``, ``rotz = atan2(uyx, uxx)``
    (the angles of ``-misset``, which applies ``U = Rz @ Ry @ Rx``).
    """
    rows = [[float(v) for v in row] for row in np.asarray(umat, dtype=np.float64).reshape(3, 3)]
    norms = [math.sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]) for r in rows]
    x, y, z = (_unit(r) for r in rows)
    mx, my, mz = norms
    if mx >= 0 and my <= 0 and mz <= 0:
        y, z = [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    if mx <= 0 and my >= 0 and mz <= 0:
        x, z = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    if mx <= 0 and my <= 0 and mz >= 0:
        x, y = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    for _ in range(2):
        xcy, ycz, zcx = _unit(_cross(x, y)), _unit(_cross(y, z)), _unit(_cross(z, x))
        x = ycz if mx <= 0 else x
        y = zcx if my <= 0 else y
        z = xcy if mz <= 0 else z
    (uxx, uxy, _), (uyx, uyy, _), (uzx, uzy, uzz) = (_unit(x), _unit(y), _unit(z))
    if uzx * uzx < 1.0:
        return (
            math.atan2(uzy, uzz),
            math.atan2(-uzx, math.sqrt(uzy * uzy + uzz * uzz)),
            math.atan2(uyx, uxx),
        )
    return math.atan2(1, 1) * 4, math.atan2(1, 1) * 2, math.atan2(uxy, -uyy)


def _generator(seed: "int | CRandom") -> CRandom:
    """A fresh generator for an internal seed, or a copy of a given state."""
    return seed.copy() if isinstance(seed, CRandom) else CRandom(int(seed))


def mosaic_umats(
    spread_rad: float, domains: int, seed: "int | CRandom" = DEFAULT_MOSAIC_SEED
) -> np.ndarray:
    """Orientation matrices of the mosaic domains, exactly as the C program makes them.

    Each domain gets ``mosaic_rotation_umat(spread_rad, ...)`` from one generator seeded with
    ``seed`` (internal value, default -12345678); domain 0 is then replaced by the identity
    (its three draws are still consumed).

    Args:
        spread_rad: mosaic spread (cap diameter) in radians.
        domains: number of domains, >= 1.
        seed: internal C seed (``seed_from_flag(-mosaic_seed flag)``), or a generator state
            to start from (copied, not advanced).

    Returns:
        (domains, 3, 3) float64 rotation matrices, ``newv = U @ v`` (72 bytes per domain).
    """
    if int(domains) < 1:
        raise ValueError(
            f"mosaic_umats needs at least one domain, got domains={domains}; "
            "pass domains >= 1 (the C program uses 1 when no spread is given)"
        )
    rng = _generator(seed)
    umats = np.empty((int(domains), 3, 3), dtype=np.float64)
    for m in range(int(domains)):  # filled in place: no per-domain list
        umats[m] = mosaic_rotation_umat(spread_rad, rng)
    umats[0] = np.eye(3)
    return umats


def random_misset(seed: "int | CRandom") -> tuple:
    """The C program's ``-misset random`` angles (rotx, roty, rotz) in radians.

    ``mosaic_rotation_umat(90.0, ...)`` with a fresh generator seeded with ``seed`` (internal
    value, ``seed_from_flag(-misset_seed flag)``, or a state to copy), converted by
    :func:`umat2misset`.
    """
    return umat2misset(mosaic_rotation_umat(90.0, _generator(seed)))


def _uniform_stream(rng: CRandom):
    """Endless iterator over ran1 values, generated in blocks (reads ahead of ``rng``)."""
    while True:
        yield from _ran1_chunk(rng, _BLOCK)


def _roi_bounds(shape: tuple, roi: tuple) -> tuple:
    """Clip an inclusive (xmin, xmax, ymin, ymax) ROI to an image of ``shape`` (slow, fast)."""
    xmin, xmax, ymin, ymax = (int(v) for v in roi)
    return max(xmin, 0), min(xmax, shape[1] - 1), max(ymin, 0), min(ymax, shape[0] - 1)


def _to_uint16(test: np.ndarray) -> np.ndarray:
    """C's ``(unsigned short) double`` on x86-64: truncate toward zero, keep the low 16 bits.

    NaN and values outside the 32-bit integer range give 0, as the hardware conversion does.
    """
    ok = np.isfinite(test) & (np.abs(test) < 2.0**31)
    t = np.where(ok, np.trunc(np.where(ok, test, 0.0)), 0.0).astype(np.int64)
    return (t & 0xFFFF).astype(np.uint16)


NOISE_BLOCK = 1 << 16
"""Pixels whose means and draws are held as Python lists at a time (about 5 MB)."""


def poisson_pixels(
    float_pixels: np.ndarray, seed: "int | CRandom", adc_offset: float
) -> tuple:
    """The C program's noise counts of the ROI's pixels: one Poisson draw per pixel, in order.

    The C noise loop visits the detector slow-major, fast fastest, and draws only inside the
    ROI, so the draws of a whole image are those of its ROI rectangle in raster order. Each
    pixel gets ``poidev(float32 value)``, then ``+ adc_offset``; values above 65535 are clamped
    and counted as overloads; the cast truncates. The draws are made `NOISE_BLOCK` pixels at a
    time from one uniform stream, carried from block to block, so memory beyond the result is
    one block's whatever the ROI's size.

    Args:
        float_pixels: (rows, cols) photons per pixel of the ROI (cast to float32, as C stores
            them); a 1-D array is one row.
        seed: internal C seed (``seed_from_flag(-seed flag)``, e.g. -2468 for ``-seed 2468``),
            or a generator state to start from (copied, not advanced).
        adc_offset: counts added to every drawn value.

    Returns:
        (counts uint16 of ``float_pixels``' shape, photons_sum float (sum of the draws before
        the offset, accumulated in draw order), overloads int).
    """
    means = np.asarray(float_pixels, dtype=np.float32).reshape(-1)
    out = np.zeros(means.shape, dtype=np.uint16)
    rng = _generator(seed)
    draw = _uniform_stream(rng).__next__
    lngamma: dict = {}
    total, overloads = 0.0, 0
    for start in range(0, means.size, NOISE_BLOCK):
        draws = _draw_all(means[start : start + NOISE_BLOCK].astype(np.float64).tolist(), draw,
                          rng, lngamma)
        for v in draws:
            total += v
        test = np.asarray(draws, dtype=np.float64) + float(adc_offset)
        over = test > 65535.0
        test[over] = 65535.0
        overloads += int(over.sum())
        out[start : start + len(draws)] = _to_uint16(test)
    return out.reshape(np.shape(float_pixels)), total, overloads


def poisson_noise(
    float_image: np.ndarray, seed: "int | CRandom", roi: tuple, adc_offset: float
) -> tuple:
    """The C program's ``-noisefile`` image: `poisson_pixels` of the ROI, 0 outside it.

    Pixels outside the inclusive ROI draw nothing and stay 0, as in C.

    Args:
        float_image: (slow, fast) image in photons per pixel (cast to float32, as C stores it).
        seed: internal C seed, or a generator state to start from (see `poisson_pixels`).
        roi: (xmin, xmax, ymin, ymax) inclusive pixel bounds, x fast and y slow.
        adc_offset: counts added to every drawn value.

    Returns:
        (image uint16 (slow, fast), photons_sum float (sum of draws before the offset),
        overloads int).
    """
    img = np.asarray(float_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(
            f"poisson_noise needs a 2-D (slow, fast) image, got shape {img.shape}; "
            "reshape the float image to (spixels, fpixels)"
        )
    x0, x1, y0, y1 = _roi_bounds(img.shape, roi)
    out = np.zeros(img.shape, dtype=np.uint16)
    if x1 < x0 or y1 < y0:
        return out, 0.0, 0
    counts, total, overloads = poisson_pixels(img[y0 : y1 + 1, x0 : x1 + 1], seed, adc_offset)
    out[y0 : y1 + 1, x0 : x1 + 1] = counts
    return out, total, overloads


def _draw_all(means: list, draw, rng: CRandom, lngamma: dict) -> list:
    """poidev of each float32-valued mean in turn, taking uniforms from ``draw()`` (hot loop,
    inlined < 12); ``rng`` holds the Gaussian spare, ``lngamma`` memoises gammln."""
    pack, unpack, exp, poi, rejection = _pack, _unpack, math.exp, _poidev, _poidev_rejection
    out = [0.0] * len(means)
    for i, xm in enumerate(means):
        if 12.0 > xm > 0.0:
            g = unpack(pack(exp(-xm)))[0]
            em = 0.0
            t = draw()
            while t > g:
                em += 1.0
                t = unpack(pack(t * draw()))[0]
            out[i] = em
        elif 12.0 <= xm <= 1.0e6:
            out[i] = rejection(xm, draw, lngamma)
        else:
            out[i] = poi(xm, draw, rng, lngamma)
    return out
