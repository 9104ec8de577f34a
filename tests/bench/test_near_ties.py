"""The bench's `same` column: a divergence from ar is a near-tie only where ar's token and the
mode's were within the dtype's bound at the first differing token (bench/near_ties.py), judged
here on constructed logits; and `--plot` draws, or fails in one line without matplotlib."""
import builtins

import pytest

from pearl_runtime.bench import near_ties, plot, report


def row(vocab: int, **logits) -> list[float]:
    out = [0.0] * vocab
    for k, v in logits.items():
        out[int(k[1:])] = v
    return out


def test_the_bound_is_a_few_units_in_the_last_place_of_the_dtype():
    # bf16 keeps 8 significant bits: at 20 (between 16 and 32) a unit is 2^-3
    assert near_ties.bound(20.0, "bfloat16") == 4 * 2 ** -3
    assert near_ties.bound(-20.0, "bfloat16") == near_ties.bound(20.0, "bfloat16")
    assert near_ties.bound(3.0, "bfloat16") == 4 * 2 ** -6
    assert near_ties.bound(20.0, "float32") == 4 * 2 ** -19     # fp32: only (near-)exact ties


def test_judge_tells_a_near_tie_from_a_real_divergence():
    tie = near_ties.judge(row(8, t2=20.0, t5=19.75, t1=3.0), ar_token=2, got_token=5, dtype="bfloat16")
    assert tie == {"gap": 0.25, "top2_gap": 0.25, "bound": 0.5, "near_tie": True}
    real = near_ties.judge(row(8, t2=20.0, t5=18.0), ar_token=2, got_token=5, dtype="bfloat16")
    assert real["gap"] == 2.0 and not real["near_tie"]
    # the mode's token far down the ranking: no near-tie, however close the runner-up
    far = near_ties.judge(row(8, t2=20.0, t3=19.9, t5=5.0), ar_token=2, got_token=5, dtype="bfloat16")
    assert far["top2_gap"] == pytest.approx(0.1) and not far["near_tie"]
    assert not near_ties.judge(row(8, t2=20.0, t5=19.75), 2, 5, "float32")["near_tie"]


def test_same_column_reads_yes_near_tie_or_no():
    ar = {"mode": "ar", "batch_size": 4, "wall_s": 1.0, "outputs_sha256": "a",
          "_outputs": [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]}
    sd = {"mode": "sd", "batch_size": 4, "wall_s": 0.5, "outputs_sha256": "b",
          "_outputs": [[1, 2, 3], [4, 9, 6], [7, 8, 2], [1, 1, 1]]}
    report.add_speedups([ar, sd])
    d = sd["divergence"]
    assert near_ties.same_text(d, False) == "NO 2/4@1"          # not judged yet: counted as NO
    d["firsts"][0]["judged"] = {"near_tie": True, "gap": 0.1, "top2_gap": 0.1, "bound": 0.5}
    d["firsts"][1]["judged"] = {"near_tie": True, "gap": 0.2, "top2_gap": 0.2, "bound": 0.5}
    assert near_ties.same_text(d, False) == "near-tie 2/4"
    d["firsts"][1]["judged"] = {"near_tie": False, "gap": 3.0, "top2_gap": 0.2, "bound": 0.5}
    assert near_ties.same_text(d, False) == "NO 1/4@2"
    assert near_ties.same_text(None, True) == "yes" and near_ties.same_text(None, None) == "-"
    report.add_speedups([ar, sd])                                # the judged divergence stays
    assert sd["divergence"]["firsts"][1]["judged"]["gap"] == 3.0
    lines = report.divergence_text([ar, sd])
    assert "request 2 token 2: gap 3 (top-2 0.2) vs bound 0.5: NO" in "\n".join(lines)


def _rows():
    rows = [{"mode": m, "batch_size": bs, "wall_s": w * bs, "tokens_per_s": 100 / w, "outputs_sha256": "x"}
            for m, w in (("ar", 1.0), ("sd", 0.5), ("auto", 0.45)) for bs in (1, 4, 16)]
    report.add_speedups(rows)
    return rows


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot.draw(_rows(), str(tmp_path / "bench.png"), "synthetic pair")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG" and out.endswith("bench.png")


def test_plot_without_matplotlib_fails_in_one_line(monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib: pip install 'pearl-serve\[plot\]'"):
        plot.check()


def test_auto_choice_line_names_the_paths_per_batch_size():
    rows = [{"mode": "auto", "batch_size": 1, "paths": {"sd": 8}},
            {"mode": "auto", "batch_size": 64, "paths": {"ar": 60, "sd+ar": 4}}]
    assert report.auto_choice_text(rows) == ["auto chose (round paths of its requests): bs 1: sd x8; "
                                             "bs 64: ar x60, sd+ar x4"]
