"""Files and messages of a command-line run, as the C program writes and prints them.

nanoBragg writes the float image, the SMV int image and (unless -nopgm/-nonoise) a PGM and a
noise image on every run, under default names when no flag names them. nbfunc does the same,
atomically: every file is first written next to its destination and renamed into place only
after all of them were written.
"""
from __future__ import annotations

import os
import time

import numpy as np

from nbfunc.io.errors import NbfuncInputError


def planned_outputs(f) -> dict[str, str]:
    """Output kind -> file name for this run (C defaults included)."""
    out = {"float": f.float_file, "int": f.int_file}
    if f.write_pgm:
        out["pgm"] = f.pgm_file
    if f.calculate_noise:
        out["noise"] = f.noise_file
    return out


def check_writable(files: dict[str, str]) -> None:
    """Fail before any work when an output directory does not exist or is not writable."""
    for kind, name in files.items():
        folder = os.path.dirname(os.path.abspath(name))
        if not os.path.isdir(folder):
            raise NbfuncInputError(f"cannot write {kind} image {name}: directory {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise NbfuncInputError(f"cannot write {kind} image {name}: directory {folder} is not writable")


def smv_fields(info, noise: bool = False):
    """SMV header values of this run (`nbfunc.io.smv.SMVHeaderFields`)."""
    from nbfunc.io.smv import smv_fields_from_geometry

    return smv_fields_from_geometry(**info.header["smv"], noise_image=noise)


def write_all(float_image: np.ndarray, stats: dict, info) -> None:
    """Write every output of the run; all or nothing.

    Args:
        float_image: (slow, fast) float32 photons per pixel.
        stats: from `nbfunc.cli.main.image_statistics`.
    """
    from nbfunc.crng import poisson_noise
    from nbfunc.io.pgm import pgm_bytes
    from nbfunc.io.smv import auto_int_scale, int_image, smv_header

    f = info.flags
    files = planned_outputs(f)
    payload: dict[str, bytes] = {"float": float_image.astype("<f4").tobytes()}
    scale = f.intfile_scale if f.intfile_scale > 0 else auto_int_scale(stats["max_I"])
    info.notes.append(f"intfile_scale = {scale:g}")
    payload["int"] = (smv_header(smv_fields(info))
                      + int_image(float_image, scale, f.adc_offset, info.roi).astype("<u2").tobytes())
    if "pgm" in files:
        pgm_scale = f.pgm_scale
        if pgm_scale <= 0:
            pgm_scale = 250.0 / (5.0 * stats["rmsd"]) if stats["rmsd"] > 0 else scale
        info.notes.append(f"pgm_scale = {pgm_scale:g}")
        payload["pgm"] = pgm_bytes(float_image, pgm_scale, info.roi)
    if "noise" in files:
        seed = f.seed
        if seed is None:
            seed = -int(time.time())
            info.notes.append(f"noise seed from the clock: -seed {-seed}")
        noise, photons, overloads = poisson_noise(float_image, seed, info.roi, f.adc_offset)
        info.notes.append(f"{photons:.0f} photons on noise image ({overloads} overloads)")
        payload["noise"] = smv_header(smv_fields(info, noise=True)) + noise.astype("<u2").tobytes()
    if info.hkl_from_file and info.hkl_grid is not None:
        files["fdump"] = f.dump_file
        payload["fdump"] = None
    _commit(files, payload, info)


def _commit(files: dict[str, str], payload: dict, info) -> None:
    """Write each payload to a temporary file, then rename them all into place."""
    from nbfunc.io.hkl import write_fdump

    staged = []
    try:
        for kind, name in files.items():
            tmp = f"{name}.nbfunc-tmp-{os.getpid()}"
            if kind == "fdump":
                try:
                    write_fdump(tmp, info.hkl_grid)
                except (OSError, NbfuncInputError):
                    info.notes.append(f"WARNING: unable to write dump file {name}")
                    continue
            else:
                with open(tmp, "wb") as handle:
                    handle.write(payload[kind])
            staged.append((tmp, name))
        for tmp, name in staged:
            os.replace(tmp, name)
    except OSError as err:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise NbfuncInputError(f"cannot write {err.filename}: {err.strerror}") from err


def print_summary(params, info) -> None:
    """Short geometry summary: convention, pivot, beam centre, sources, domains, steps."""
    h, p = info.header, params
    print(f"{h['convention']} convention, pivot {h['pivot']}; "
          f"beam centre Fbeam={h['fbeam_mm']:g} Sbeam={h['sbeam_mm']:g} mm, "
          f"distance={h['distance_mm']:g} mm, close_distance={h['close_distance_mm']:g} mm")
    print(f"  {p.detector.fpixels}x{p.detector.spixels} pixels of {h['pixel_size_mm']:g} mm; "
          f"{p.beam.sources.n_sources} sources, {p.crystal.mosaic_domains} mosaic domains, "
          f"{p.crystal.phisteps} phi steps, {p.sampling.oversample}x{p.sampling.oversample} "
          f"sub-pixels, {p.detector.thicksteps} sensor layers")
    for line in info.notes:
        print(f"  {line}")
    info.notes.clear()


def print_statistics(stats: dict, info, seconds: float) -> None:
    """The statistics line the C program prints, and what was written."""
    for line in info.notes:
        print(line)
    print(f"max_I = {stats['max_I']:g}  at pixel {stats['max_pixel'][0]} {stats['max_pixel'][1]}")
    print(f"mean= {stats['mean']:g} rms= {stats['rms']:g} rmsd= {stats['rmsd']:g}")
    print(f"rendered {stats['n']} pixels in {seconds:.3f} s")
