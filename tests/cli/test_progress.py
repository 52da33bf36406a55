"""Tests for nbfunc.cli.progress: when a meter shows, what it prints, and that reporting
progress from the renderer's chunk loop leaves the image unchanged."""
import io

import pytest
import torch

import nbfunc.render
from nbfunc.cli import main, progress
from nbfunc.cli.derive import derive
from nbfunc.render import initial_carry, render_pixels_for_cli

# phi starts at 0 with several steps: the C program's phi carry-over crosses band borders
CARRY = ["-cell", "40", "50", "60", "90", "90", "90", "-default_F", "100", "-N", "3",
         "-detpixels", "20", "-pixel", "0.4", "-distance", "60", "-phi", "0", "-osc", "3",
         "-phisteps", "3", "-mosaic", "0.5", "-mosaic_dom", "2", "-misset", "10", "20", "30",
         "-oversample", "1", "-chunk", "120"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class TestWanted:
    def test_noprogress_turns_it_off(self):
        assert not progress.wanted(False, FakeTerminal(), 1000)

    def test_terminal_shows_any_multi_chunk_render(self):
        assert progress.wanted(True, FakeTerminal(), 2)
        assert not progress.wanted(True, FakeTerminal(), 1)

    def test_pipe_shows_only_long_renders(self):
        assert not progress.wanted(True, io.StringIO(), progress.MANY_CHUNKS - 1)
        assert progress.wanted(True, io.StringIO(), progress.MANY_CHUNKS)


class TestMeter:
    def test_pipe_gets_one_line_per_ten_percent(self):
        out = io.StringIO()
        report = progress.meter(out, terminal=False)
        for done in range(0, 101):
            report(done, 100)
        lines = out.getvalue().splitlines()
        assert lines == [f"nbfunc: rendering {p:3d}% done" for p in range(0, 101, 10)]

    def test_terminal_redraws_in_place_and_ends_the_line(self):
        out = FakeTerminal()
        report = progress.meter(out, terminal=True, width=10)
        report(1, 4)
        report(4, 4)
        text = out.getvalue()
        assert text.count("\r") == 2 and text.endswith("\n")
        assert "[##........]  25%" in text and "[##########] 100%" in text


def test_progress_callback_sees_every_chunk_and_changes_nothing():
    params, _ = derive(CARRY)
    one, flat, carry_one = render_pixels_for_cli(params, initial_carry(params), compile=False)
    calls = []
    reported, flat_reported, carry_reported = render_pixels_for_cli(
        params, initial_carry(params), compile=False, progress=lambda d, t: calls.append((d, t)))
    plan, pixels = nbfunc.render.make_plan(params, large_chunks=False)
    total = plan.chunks(len(pixels))
    assert calls == [(i, total) for i in range(1, total + 1)] and total > 3
    assert torch.equal(one, reported) and torch.equal(flat, flat_reported)
    assert torch.equal(carry_one.orientation, carry_reported.orientation)
    image = nbfunc.simulate_with_carry(params, initial_carry(params))[0]
    assert torch.equal(image.reshape(-1)[flat], one)


@pytest.mark.parametrize("flag, shown", [([], True), (["-noprogress"], False)])
def test_cli_progress_goes_to_stderr(flag, shown, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(progress, "MANY_CHUNKS", 4)
    assert main.run(CARRY + ["-nonoise", "-nopgm"] + flag) == 0
    captured = capsys.readouterr()
    assert ("rendering 100% done" in captured.err) == shown
    assert "% done" not in captured.out
