"""Session-wide settings: renders compile only in the tests that test compiling.

Outside ``tests/transforms/test_compile.py`` (which sets `nbfunc.compile.COMPILE_AFTER` and
``COMPILE_AFTER_TRANSFORMS`` to 0) no render is compiled however much eager work the session
has done, so that the suite's
run time does not depend on the order of its tests, and no test waits for a compile it does
not test. The command line's own decision (compile at 50 M evaluations) is unchanged.
"""
import nbfunc.compile

nbfunc.compile.COMPILE_AFTER = nbfunc.compile.COMPILE_AFTER_TRANSFORMS = 1 << 62
