"""The ```python blocks of docs/ensemble.md run, in order, in one namespace, in a scratch folder."""
import os


def test_docs_code_runs(tmp_path, monkeypatch, run_doc):
    monkeypatch.setattr("nbfunc.compile.COMPILE_AFTER", 1 << 62)  # small renders: eager
    monkeypatch.chdir(tmp_path)
    namespace = run_doc("ensemble.md", 4)
    assert namespace["result"].converged and namespace["out"]["converged"]
    assert 0.2 < float(namespace["pulls"].pow(2).mean()) < 5
    assert sorted(os.listdir(tmp_path / "shots")) == sorted(
        [f"shot_000{i}.{e}" for i in range(3) for e in ("json", "npy")] + ["spec.json", "refined.json"])
    assert namespace["manifest"]["complete"]                    # the dataset block
    assert sorted(os.listdir(tmp_path / "dataset")) == sorted(
        [f"shots_{a:07d}-{b:07d}.{e}" for a, b in ((0, 2), (3, 5)) for e in ("h5", "json")]
        + ["spec.json", "manifest.json"])
