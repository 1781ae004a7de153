"""The demo's report: smoothed loss curves, headline metrics with intervals, n, meaning and targets."""

import json

import numpy as np

from nmm.eval.report import machine_info, plot_losses, smooth, wilson_interval, write_report
from nmm.eval.results import empty_results, write_results

MACHINE = {"cpu": "Test CPU 9000", "cpu_count": 2, "torch_threads": 2, "torch": "2.13.0+cpu", "python": "3.11.7",
           "platform": "Linux"}


def write_metrics_jsonl(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        text = float(np.clip(1.2 * np.exp(rng.normal(0, 0.6)), 0.2, 2.2))  # single batches swing
        image = 3.0 - i / n
        rows.append({"step": (i + 1) * 5, "loss": (text + image) / 2, "loss_text": text, "loss_image": image,
                     "tokens_per_s": 6400.0, **({"loss_spike": True} if i == 30 else {})})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_losses_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics_jsonl(metrics)
    out = tmp_path / "loss.png"
    assert plot_losses(metrics, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not plot_losses(tmp_path / "missing.jsonl", tmp_path / "x.png")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert not plot_losses(tmp_path / "empty.jsonl", tmp_path / "x.png") and not (tmp_path / "x.png").exists()


def test_smoothing_reduces_noise_without_lagging():
    assert np.allclose(smooth([2.0] * 10, 5), 2.0)
    steps = np.arange(400)
    trend = 5 * np.exp(-steps / 100) + 0.5
    noisy = trend * np.exp(np.random.default_rng(0).normal(0, 0.5, 400))  # single batches swing
    smoothed = smooth(noisy, 31)
    assert np.std(smoothed / trend) < np.std(noisy / trend) / 3
    # A centred average follows a falling curve: no lag (an EMA would sit above it).
    assert abs(np.median(np.log(smooth(trend, 31) / trend))) < 0.01


def test_wilson_interval():
    low, high = wilson_interval(10, 100)
    assert abs(low - 0.0552) < 1e-3 and abs(high - 0.1744) < 1e-3
    assert wilson_interval(0, 64)[0] == 0.0 and 0 < wilson_interval(0, 64)[1] < 0.07
    assert wilson_interval(64, 64)[1] == 1.0


def make_run(tmp_path, eval_report: bool):
    run = tmp_path / ("with" if eval_report else "without")
    (run / "eval").mkdir(parents=True)
    write_metrics_jsonl(run / "metrics.jsonl")
    data = empty_results()
    data["records"] = [
        {"task": "shapes_captioning", "split": "heldout", "metric": "exact_match", "value": 0.822, "ci_low": 0.786,
         "ci_high": 0.855, "n": 500, "better": "higher", "key": "m2t_exact_match"},
        {"task": "shapes_captioning", "split": "heldout_combo", "metric": "exact_match", "value": 0.14,
         "ci_low": 0.11, "ci_high": 0.171, "n": 500, "better": "higher", "key": "heldout_combo_m2t_exact_match"},
        {"task": "shapes_t2i", "split": "heldout", "metric": "judged_accuracy", "value": 0.524, "ci_low": 0.48,
         "ci_high": 0.568, "n": 500, "better": "higher", "key": "m2g_judged_accuracy"},
        {"task": "text_perplexity", "split": "heldout", "metric": "perplexity", "value": 43.4, "ci_low": 41.9,
         "ci_high": 45.0, "n": 100, "better": "lower", "key": "text_perplexity"},
    ]
    write_results(run / "eval" / "results.json", data)
    if eval_report:
        (run / "eval" / "report.html").write_text("<html></html>")
    metrics = {"m2t_exact_match": 0.822, "heldout_combo_m2t_exact_match": 0.14, "m2g_judged_accuracy": 0.524,
               "text_perplexity": 43.4, "tokenizer_judge_exact": 0.995, "tokenizer_psnr_db": 35.1,
               "steps": 1509, "params": 1_950_000, "train_minutes": 14.8, "tokenizer_minutes": 1.1,
               "eval_minutes": 0.6, "demo_minutes": 16.7}
    return run, metrics


def test_report_shows_intervals_n_meaning_targets_machine_and_eval_link(tmp_path):
    run, metrics = make_run(tmp_path, eval_report=True)
    page = write_report(run, metrics, {}, None, title="nmm demo: test", machine=MACHINE, tokenizer_n=1000).read_text()
    assert "<b>0.822</b> <span class='ci'>[0.786, 0.855]</span>" in page and "n = 500" in page
    assert "[0.110, 0.171]" in page  # the held-out combinations' interval too
    assert "<b>43.4</b>" in page and "[41.9, 45.0]" in page and "n = 100" in page
    assert "Caption exact match (M2T)" in page and "names every shape with the right kind" in page
    assert "lower is better" in page
    assert "≥ 0.90" in page and "≥ 0.60" in page  # targets from docs/demo.md (issue 18)
    low, high = wilson_interval(995, 1000)  # the tokenizer has only a rate: a Wilson interval from the count
    assert f"[{low:.3f}, {high:.3f}]" in page and "n = 1,000" in page
    assert "href='eval/report.html'" in page
    assert "Test CPU 9000" in page and "2.13.0+cpu" in page and "1,509" in page and "14.8 min" in page
    assert "<img src='loss.png'" in page and (run / "loss.png").exists()
    assert "m2t_exact_match</td>" not in page  # raw key names are not shown as metric names
    # Metrics the run has no number for are left out, not shown as zero.
    assert "Question answering accuracy" not in page


def test_report_without_eval_report_has_no_link(tmp_path):
    run, metrics = make_run(tmp_path, eval_report=False)
    page = write_report(run, metrics, {}, None, machine=MACHINE).read_text()
    assert "eval/report.html" not in page and "[0.786, 0.855]" in page


def test_machine_info_names_the_machine():
    info = machine_info()
    assert info["cpu"] and info["cpu_count"] >= 1 and info["torch_threads"] >= 1 and info["torch"]


def test_terminal_summary_rows_carry_intervals_n_and_targets(tmp_path):
    from nmm.eval.report import headline_rows

    run, metrics = make_run(tmp_path, eval_report=False)
    rows = {name: (held, combo, target) for name, held, combo, target in headline_rows(run, metrics)}
    held, combo, target = rows["Caption exact match (M2T)"]
    assert held == "0.822 [0.786, 0.855] n=500" and combo == "0.140 [0.110, 0.171] n=500" and target == "≥ 0.90; combos: ≥ 0.45"
    assert rows["Question answering accuracy"][0] == "-"  # not evaluated in this run: shown as missing
