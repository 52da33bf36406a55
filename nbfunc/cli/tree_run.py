"""``-params FILE``: render a parameter tree saved by ``-params_out`` or `nbfunc.Params.save`.

The tree holds the physics, so the command line then takes only what says where and how the
image is written and computed: the output flags, ``-roi`` (replaces ``sampling.roi``),
``-chunk`` (replaces ``sampling.chunk``), ``-seed`` (noise), ``-dtype`` (converts the tree;
the file's dtype otherwise), ``-device``, and a convention flag (``-mosflm``, ``-denzo``,
``-adxv``, ``-xds``, ``-dials``) that only names the beam centre in the SMV header and must
match the tree's axes and pivot. Any other flag (``-cell``, ``-distance``, ``-mask``, ...) is
refused in one line: change the tree in Python instead.
"""
from __future__ import annotations

import numpy as np
import torch

from nbfunc.cli.cflags import CFlags
from nbfunc.cli.checks import check_device, check_float_image, facing_away
from nbfunc.cli.derive import RunInfo, finish_info, reading
from nbfunc.cli.flags import FlagError, given_flags, parse_flags
from nbfunc.cli.header import convention_of, fits_convention
from nbfunc.cli.rules import resolve_roi
from nbfunc.detector import detector_frame
from nbfunc.io.errors import first_validation_error
from nbfunc.params import Params, Sampling

OUTPUT_FLAGS = ("-params", "-params_out", "-floatfile", "-intfile", "-pgmfile", "-noisefile",
                "-nonoise", "-nopgm", "-scale", "-pgmscale", "-adc", "-seed", "-printout",
                "-printout_pixel", "-noprogress", "-progress", "-roi", "-chunk", "-dtype",
                "-device", "-cbffile", "-nxsfile", "-nxs_compression")
"""Flags accepted with -params: outputs, noise, ROI and how the render runs."""

LABEL_FLAGS = {"-mosflm": "MOSFLM", "-denzo": "DENZO", "-adxv": "ADXV", "-xds": "XDS",
               "-dials": "DIALS"}
"""Convention flags accepted with -params as labels of the header's beam centre."""


def check_tree_flags(given: dict[str, str], name: str) -> None:
    """Refuse, in one line, a flag that would set physics the tree already holds.

    Args:
        given: `nbfunc.cli.flags.given_flags` of the command line. name: the -params file.
    """
    for handler, token in given.items():
        if handler not in OUTPUT_FLAGS and handler not in LABEL_FLAGS:
            raise FlagError(f"{token} cannot be given with -params {name}: the tree holds the "
                            "physics; change it in Python (nbfunc.Params.load, edit, save) or "
                            "drop the flag (allowed: output flags, -roi, -seed, -chunk, -dtype, "
                            "-device)")


def load_tree(path: str, name: str) -> Params:
    """`Params.load` with its errors as one line naming -params and the file.

    Raises:
        NbfuncInputError: a missing, unreadable or oversized file.
        FlagError: JSON that is not a valid tree (names the first field and the fix).
    """
    from pydantic import ValidationError

    with reading("-params"):
        try:
            return Params.load(path)
        except ValidationError as err:
            raise tree_file_error(err, name) from None


def tree_file_error(err, name: str) -> FlagError:
    """A pydantic ValidationError of a tree file as one line: file, field path and message."""
    where, message = first_validation_error(err)
    where = where or "the tree"
    message = " ".join(message.removeprefix("Value error, ").split())[:160]
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return FlagError(f"-params {name}: {where}: {message}{more}; give a tree written by "
                     "-params_out or Params.save")


def adjust_tree(params: Params, f: CFlags, given: dict[str, str], dtype: torch.dtype | None,
                name: str) -> Params:
    """The tree with -roi, -chunk and -dtype (or ``dtype``) applied, validated again."""
    from pydantic import ValidationError

    det, smp = params.detector, params.sampling
    changes = {}
    if "-roi" in given:
        changes["roi"] = resolve_roi(f.roi, det.fpixels, det.spixels)
    if "-chunk" in given:
        changes["chunk"] = f.chunk
    if dtype is None and "-dtype" in given:
        dtype = torch.float32 if f.dtype == "float32" else torch.float64
    try:
        if changes:
            fields = {k: getattr(smp, k) for k in Sampling.model_fields}
            sampling = Sampling.model_validate({**fields, **changes})
            params = Params(beam=params.beam, detector=det, crystal=params.crystal,
                            sampling=sampling)
        return params if dtype is None else params.to(dtype=dtype)
    except ValidationError as err:
        raise tree_file_error(err, name) from None


def header_convention(params: Params, f: CFlags, given: dict[str, str]) -> str:
    """The convention naming the header's beam centre: that of the convention flags given
    (the last one, as C reads them), which must fit the tree
    (`nbfunc.cli.header.fits_convention`); else `convention_of` the tree."""
    if not any(handler in LABEL_FLAGS for handler in given):
        return convention_of(params)
    name = f.beam_convention
    token = next(t for h, t in given.items() if LABEL_FLAGS.get(h) == name)
    if not fits_convention(params, name):
        raise FlagError(f"{token} with -params: the tree's axes and pivot are not the {name} "
                        f"convention's, so it cannot name its beam centre; drop {token} (the "
                        f"header then uses the {convention_of(params).upper()} names)")
    return name


def derive_from_tree(argv: list[str], dtype: torch.dtype | None, path) -> tuple[Params, RunInfo]:
    """(tree, run information) of a command line with -params FILE.

    Args:
        argv: the flags. dtype: convert the tree to it (None: -dtype, or the file's).
        path: file name -> path to open (relative names resolved as `derive` does).
    Raises:
        FlagError, NbfuncInputError: a flag that sets physics, a bad file, a bad -roi.
    """
    given = given_flags(argv)
    f = parse_flags(list(argv))
    check_tree_flags(given, f.params_in)
    check_device(f.device)
    params = adjust_tree(load_tree(path(f.params_in), f.params_in), f, given, dtype, f.params_in)
    info = RunInfo(flags=f, warnings=list(f.warnings))
    info.notes.append(f"parameter tree from {f.params_in}")
    frame = detector_frame(params.detector, params.beam.beam_vector)
    facing = facing_away(frame)
    if facing:
        info.warnings.append(facing)
    check_float_image(params, frame)
    mask = params.sampling.mask
    mask = None if mask is None else np.asarray(mask.cpu().numpy(), dtype=bool)
    return params, finish_info(info, params, header_convention(params, f, given), mask)
