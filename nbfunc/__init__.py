"""nbfunc: nanoBragg as pure, differentiable functions of a pydantic parameter tree."""
from nbfunc._version import __version__
from nbfunc.params import Beam, Crystal, Detector, Params, Sampling, SourceGrid, SourceList
from nbfunc import tree as _tree  # registers the pytree nodes
from nbfunc.tree import leaf_paths, replace_leaves, stack, unstack
from nbfunc.cli.derive import params_from_args
from nbfunc.render import (PhiCarry, initial_carry, rendered_pixels, simulate, simulate_pixels,
                           simulate_with_carry)

__all__ = ["__version__", "params_from_args", "Beam", "Crystal", "Detector", "Params", "Sampling",
           "SourceGrid", "SourceList", "PhiCarry", "initial_carry", "simulate", "simulate_pixels",
           "rendered_pixels", "simulate_with_carry", "leaf_paths", "replace_leaves", "stack",
           "unstack"]
