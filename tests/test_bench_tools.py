"""bench/ tools that summarise runs: the numbers they print are computed right."""
import json

import pytest

from bench.compare_runs import summary
from bench.sweep_scan_bwd import parse_setting, scan_setting
from kernels import scan_triton


def test_compare_runs_whole_run_rate_counts_the_slow_windows(tmp_path):
    # batch 100, windows of 10 steps: a first (warm-up) window, then 2 s (500 images/s) and 10 s (100 images/s)
    records = [{"step": 10, "loss": 1.0, "images_per_s": 50.0}, {"step": 20, "loss": 0.9, "images_per_s": 500.0},
               {"step": 30, "loss": 0.8, "images_per_s": 100.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, means, evals, median, overall = summary(tmp_path, 10)
    assert means == ["1.0000", "0.9000", "0.8000"] and evals == ""
    assert median == 100.0
    assert abs(overall - 2000 / 12) < 1e-9  # 2,000 images after the first window, in 12 s


def test_scan_settings_set_the_named_knobs_and_restore_them():
    assert parse_setting("16,1,0") == dict(CK=16, SEG=1, BWD_MAXNREG=0, BWD_WARPS=1, BWD_BLOCK_E=32)
    assert parse_setting("PF=8,WAVES=2,FWD_MAXNREG=None") == dict(PF=8, WAVES=2, FWD_MAXNREG=None)
    assert parse_setting("shipped") == {}
    with pytest.raises(ValueError, match="_PFX"):
        parse_setting("PFX=1")
    shipped = (scan_triton._PF, scan_triton._BWD_MAXNREG, scan_triton._SEG)
    with scan_setting("PF=0,BWD_MAXNREG=0,SEG=1"):
        assert (scan_triton._PF, scan_triton._BWD_MAXNREG, scan_triton._SEG) == (0, None, 1)  # 0 = no register cap
    assert (scan_triton._PF, scan_triton._BWD_MAXNREG, scan_triton._SEG) == shipped
