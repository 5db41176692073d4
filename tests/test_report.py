"""The experiment report on fixed numbers: the paired-t interval against a hand computation,
pairing by seed, the table's Δ / * / † marks and reference rows, the baseline warnings, the
JSON and CSV files and the plots. No models are built."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
from scipy import stats as scipy_stats

from metalm.experiments.report import aggregate, markdown_table, study_warnings, write_reports
from metalm.experiments.stats import budget_key, budget_label, paired_differences, paired_interval

BASE = "pre-trained"
HEADLINE = {"rte": ("dev", "accuracy"), "mrpc": ("dev", "f1")}
T_975_DF2 = 4.302652729911275  # t_{0.975, 2}: solves t / (2 sqrt(2 + t²)) = 0.475, the df=2 CDF


def _rows(method: str, values: dict[int, float], *, target: str = "rte", fraction: float | None = 0.1,
          per_class: int | None = None, split: str = "dev", metric: str = "accuracy",
          degenerate: tuple[int, ...] = ()) -> list[dict]:
    return [{"method": method, "target": target, "fraction": fraction, "per_class": per_class, "seed": seed,
             "split": split, "metric": metric, "value": value, "train_size": 100, "degenerate": seed in degenerate}
            for seed, value in values.items()]


def _table_cells(table: str) -> dict[str, list[str]]:
    """Row name -> its cells, for the markdown table's body."""
    out = {}
    for line in table.splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def _sweep() -> list[dict]:
    """Baseline and two methods on RTE @10% over three seeds: 'steady' gains about 5 points in
    every seed, 'noisy' gains 2 on average with a loss in one seed."""
    return (_rows(BASE, {0: 0.60, 1: 0.62, 2: 0.64}) + _rows("steady", {0: 0.65, 1: 0.68, 2: 0.69})
            + _rows("noisy", {0: 0.70, 1: 0.57, 2: 0.65}))


def _table(rows: list[dict], methods=(BASE, "steady", "noisy"), references=()) -> str:
    summary = aggregate(rows)
    return markdown_table(summary, headline=HEADLINE, methods=methods, baseline=BASE, references=references,
                          differences=paired_differences(rows, baseline=BASE))


# --- paired_interval ------------------------------------------------------------------------------

def test_paired_interval_matches_a_hand_computation():
    # Differences [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, so the sample
    # variance is 42/18 = 7/3 and the standard error sqrt(7/3) / sqrt(3) = sqrt(7) / 3.
    result = paired_interval([11.0, 12.0, 14.0], [10.0, 10.0, 10.0])
    mean, sd, se = 7 / 3, math.sqrt(7 / 3), math.sqrt(7) / 3
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(mean, rel=1e-12)
    assert result["sd"] == pytest.approx(sd, rel=1e-12)
    assert result["lo"] == pytest.approx(mean - T_975_DF2 * se, rel=1e-9)
    assert result["hi"] == pytest.approx(mean + T_975_DF2 * se, rel=1e-9)
    # t = mean / se = sqrt(7); with df 2 the two-sided p is 1 - t / sqrt(2 + t²) = 1 - sqrt(7) / 3.
    assert result["p"] == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-9)
    assert result["p"] == pytest.approx(scipy_stats.ttest_rel([11, 12, 14], [10, 10, 10]).pvalue, rel=1e-9)
    assert result["lo"] < 0 < result["hi"] and not result["excludes_zero"]


def test_paired_interval_with_one_pair_has_no_interval():
    result = paired_interval([0.7], [0.6])
    assert result["n"] == 1 and result["mean"] == pytest.approx(0.1)
    assert (result["sd"], result["lo"], result["hi"]) == (None, None, None)
    assert result["p"] == 1.0 and not result["excludes_zero"]


def test_paired_interval_with_identical_differences():
    shifted = paired_interval([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert (shifted["lo"], shifted["hi"], shifted["sd"]) == (3.0, 3.0, 0.0)
    assert shifted["p"] == 0.0 and shifted["excludes_zero"]
    same = paired_interval([0.5, 0.6], [0.5, 0.6])
    assert (same["lo"], same["hi"]) == (0.0, 0.0) and same["p"] == 1.0 and not same["excludes_zero"]


def test_paired_interval_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equally long"):
        paired_interval([1.0, 2.0], [1.0])


# --- paired_differences ---------------------------------------------------------------------------

def test_pairing_is_by_seed_and_uses_only_common_seeds():
    rows = _rows(BASE, {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.80}) + _rows("other", {2: 0.75, 0: 0.51, 1: 0.64})
    random.Random(0).shuffle(rows)
    [d] = paired_differences(rows, baseline=BASE)
    assert (d["method"], d["baseline"], d["target"], d["fraction"], d["per_class"]) == ("other", BASE, "rte", 0.1,
                                                                                         None)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["differences"] == pytest.approx([0.01, 0.04, 0.05])
    assert d["mean"] == pytest.approx(paired_interval([0.51, 0.64, 0.75], [0.50, 0.60, 0.70])["mean"])


def test_a_seed_scored_twice_is_an_error():
    rows = _rows(BASE, {0: 0.5}) + _rows(BASE, {0: 0.6})
    with pytest.raises(ValueError, match="seed 0"):
        paired_differences(rows, baseline=BASE)


def test_old_rows_without_per_class_or_degenerate_still_aggregate():
    rows = [{k: v for k, v in r.items() if k not in ("per_class", "degenerate")} for r in _sweep()]
    summary = {s["method"]: s for s in aggregate(rows)}
    assert summary[BASE]["per_class"] is None and summary[BASE]["degenerate_runs"] == 0
    assert summary[BASE]["mean"] == pytest.approx(0.62) and summary[BASE]["std"] == pytest.approx(0.02)
    assert len(paired_differences(rows, baseline=BASE)) == 2


def test_a_row_needs_exactly_one_budget():
    with pytest.raises(ValueError, match="exactly one of 'fraction' and 'per_class'"):
        budget_key({"fraction": 0.1, "per_class": 8})
    with pytest.raises(ValueError, match="exactly one"):
        aggregate(_rows(BASE, {0: 0.5}, fraction=None))
    assert budget_label((0.1, None)) == "10%" and budget_label((None, 8)) == "8/class"


# --- the markdown table ---------------------------------------------------------------------------

def test_table_stars_a_difference_exactly_when_its_interval_excludes_zero():
    rows = _sweep()
    by_method = {d["method"]: d for d in paired_differences(rows, baseline=BASE)}
    assert by_method["steady"]["excludes_zero"] and not by_method["noisy"]["excludes_zero"]
    table = _table(rows)
    cells = _table_cells(table)
    assert cells["method"] == ["rte accuracy @10%"]
    assert cells[BASE] == ["62.0 ± 2.0"]  # the baseline has no Δ
    assert cells["steady"] == ["67.3 ± 2.1 (Δ +5.3 [+3.9, +6.8])*"]
    # noisy − baseline = [10, −5, 1] points: sd sqrt(57), half-width 4.3027 · sqrt(57) / sqrt(3) = 18.75.
    assert cells["noisy"] == ["64.0 ± 6.6 (Δ +2.0 [−16.8, +20.8])"]
    assert f"Δ: paired difference to {BASE} over seeds, 95% paired-t interval; * interval excludes 0" in table
    assert "†" not in table


def test_table_with_one_seed_shows_n_instead_of_an_interval():
    rows = _rows(BASE, {0: 0.60}) + _rows("other", {0: 0.612})
    assert _table_cells(_table(rows, methods=(BASE, "other")))["other"] == ["61.2 ± 0.0 (Δ +1.2, n=1)"]


def test_dagger_marks_a_cell_with_a_degenerate_seed_only():
    rows = (_rows(BASE, {0: 0.60, 1: 0.62, 2: 0.64}) + _rows("steady", {0: 0.65, 1: 0.68, 2: 0.69}, degenerate=(1,))
            + _rows("noisy", {0: 0.70, 1: 0.57, 2: 0.65}))
    table = _table(rows)
    cells = _table_cells(table)
    assert cells["steady"] == ["67.3 ± 2.1† (Δ +5.3 [+3.9, +6.8])*"]
    assert "†" not in cells[BASE][0] and "†" not in cells["noisy"][0]
    assert "† predictions constant (one class) on the scored split in at least one seed" in table


def test_reference_rows_show_their_value_in_every_budget_column_of_their_target():
    rows = (_sweep() + _rows(BASE, {0: 0.70, 1: 0.72}, fraction=1.0) + _rows(BASE, {0: 0.80}, target="mrpc",
                                                                            metric="f1"))
    references = [{"reference": "majority class", "target": "rte", "split": "dev", "metric": "accuracy",
                   "value": 0.527},
                  {"reference": "majority class", "target": "mrpc", "split": "dev", "metric": "f1", "value": 0.812},
                  {"reference": "zero-shot cosine", "target": "rte", "split": "dev", "metric": "accuracy",
                   "value": 0.551},
                  {"reference": "majority class", "target": "rte", "split": "test", "metric": "accuracy",
                   "value": 0.5},  # not the headline split: not shown
                  {"reference": "chance", "target": "sst2", "split": "dev", "metric": "accuracy", "value": 0.5}]
    cells = _table_cells(_table(rows, references=references))
    assert cells["method"] == ["rte accuracy @10%", "rte accuracy @100%", "mrpc f1 @10%"]
    assert cells["*majority class*"] == ["52.7", "52.7", "81.2"]
    assert cells["*zero-shot cosine*"] == ["55.1", "55.1", "–"]
    assert "*chance*" not in cells  # its target has no column
    assert cells["steady"][1] == "–"


def test_per_class_budgets_get_their_own_columns_after_the_fractions():
    rows = (_rows(BASE, {0: 0.55, 1: 0.57}, fraction=None, per_class=16) + _rows(BASE, {0: 0.6, 1: 0.62})
            + _rows(BASE, {0: 0.52, 1: 0.50}, fraction=None, per_class=8)
            + _rows("other", {0: 0.56, 1: 0.53}, fraction=None, per_class=8))
    cells = _table_cells(_table(rows, methods=(BASE, "other")))
    assert cells["method"] == ["rte accuracy @10%", "rte accuracy @8/class", "rte accuracy @16/class"]
    assert cells[BASE] == ["61.0 ± 1.4", "51.0 ± 1.4", "56.0 ± 1.4"]
    assert cells["other"][0] == "–" and cells["other"][1].startswith("54.5 ± 2.1 (Δ +3.5 [")


# --- warnings -------------------------------------------------------------------------------------

def _majority(target: str, metric: str, value: float) -> dict:
    return {"reference": "majority class", "target": target, "split": "dev", "metric": metric, "value": value}


def test_warnings_name_a_target_whose_baseline_is_below_its_majority_class():
    rows = _sweep() + _rows(BASE, {0: 0.60, 1: 0.62}, target="mrpc", metric="f1")
    references = [_majority("rte", "accuracy", 0.527), _majority("mrpc", "f1", 0.684)]
    [warning] = study_warnings(aggregate(rows), baseline=BASE, headline=HEADLINE, references=references)
    assert warning.startswith(f"mrpc @10%: baseline {BASE!r} scores dev f1 61.00")
    assert "against majority class 68.40" in warning and "not above the majority class" in warning


def test_warnings_flag_a_degenerate_baseline_even_above_the_majority_class():
    rows = _rows(BASE, {0: 0.60, 1: 0.62}, degenerate=(0, 1))
    [warning] = study_warnings(aggregate(rows), baseline=BASE, headline=HEADLINE,
                               references=[_majority("rte", "accuracy", 0.527)])
    assert warning.startswith(f"rte @10%: baseline {BASE!r}") and "in 2 of 2 seed(s)" in warning
    assert "not above" not in warning


def test_a_fine_tune_below_the_zero_shot_cosine_is_flagged():
    """A regression baseline far above the constant mean (0) but below the untrained encoder's cosine:
    the fine-tune lost what the encoder knew, and the highest floor is the one named."""
    rows = _rows(BASE, {0: 0.47, 1: 0.60, 2: 0.64}, target="stsb", metric="pearson")
    references = [{"reference": "constant mean", "target": "stsb", "split": "dev", "metric": "pearson", "value": 0.0},
                  {"reference": "zero-shot cosine", "target": "stsb", "split": "dev", "metric": "pearson",
                   "value": 0.87}]
    [warning] = study_warnings(aggregate(rows), baseline=BASE, headline={"stsb": ("dev", "pearson")},
                               references=references)
    assert "not above the zero-shot cosine" in warning and "against zero-shot cosine 87.00" in warning


def test_no_warnings_for_a_good_baseline():
    references = [_majority("rte", "accuracy", 0.527),
                  {"reference": "constant mean", "target": "rte", "split": "dev", "metric": "accuracy",
                   "value": float("nan")}]
    assert study_warnings(aggregate(_sweep()), baseline=BASE, headline=HEADLINE, references=references) == []


# --- write_reports --------------------------------------------------------------------------------

def test_write_reports_files_and_results_json(tmp_path):
    rows = (_sweep() + _rows(BASE, {0: 0.52, 1: 0.50, 2: 0.51}, fraction=None, per_class=8, degenerate=(1,))
            + _rows("steady", {0: 0.56, 1: 0.53, 2: 0.57}, fraction=None, per_class=8)
            + _rows(BASE, {0: 0.60}, target="mrpc", metric="f1"))
    references = [_majority("rte", "accuracy", 0.527), _majority("mrpc", "f1", 0.812),
                  {"reference": "zero-shot cosine", "target": "rte", "split": "dev", "metric": "accuracy",
                   "value": 0.55}]
    curves = [{"method": r["method"], "target": r["target"], "fraction": r["fraction"], "per_class": r["per_class"],
               "seed": r["seed"], "curve": [{"epoch": 1.0, "dev/accuracy": 0.5}, {"epoch": 2.0, "dev/accuracy": 0.6}]}
              for r in rows if r["target"] == "rte"]
    paths = write_reports(rows, tmp_path, headline=HEADLINE, methods=[BASE, "steady", "noisy"], title="t",
                          note="encoder: tiny", curves=curves, references=references)
    for name in ("results.md", "results.csv", "differences.csv", "results.json", "scores.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert set(paths) == {"markdown", "csv", "differences", "json", "plot", "curves"}
    for name in ("scores.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"title", "baseline", "test", "summary", "differences", "references", "warnings", "runs"}
    assert results["baseline"] == BASE and results["test"] == "two-sided paired t, 95%"
    assert results["references"] == references and len(results["runs"]) == len(rows)
    per_class = [s for s in results["summary"] if s["method"] == BASE and s["per_class"] == 8]
    assert [s["degenerate_runs"] for s in per_class] == [1]
    steady = {budget_key(d): d for d in results["differences"] if d["method"] == "steady"}
    assert steady[(None, 8)]["seeds"] == [0, 1, 2]
    assert steady[(None, 8)]["differences"] == pytest.approx([0.04, 0.03, 0.06])
    # Both baseline cells fall short: RTE 8/class is degenerate in seed 1, MRPC is below its majority.
    assert [w.split(":")[0] for w in results["warnings"]] == ["rte @8/class", "mrpc @10%"]
    table = (tmp_path / "results.md").read_text()
    assert "| method | rte accuracy @10% | rte accuracy @8/class | mrpc f1 @10% |" in table
    assert "| *majority class* | 52.7 | 52.7 | 81.2 |" in table and "encoder: tiny" in table
    with open(tmp_path / "results.csv", newline="") as handle:
        summary_csv = list(csv.DictReader(handle))
    assert {"per_class", "degenerate_runs"} <= set(summary_csv[0])
    with open(tmp_path / "differences.csv", newline="") as handle:
        differences_csv = list(csv.DictReader(handle))
    assert len(differences_csv) == len(results["differences"]) == 3
    assert {r["seeds"] for r in differences_csv} == {"0 1 2"}


def test_write_reports_rejects_a_baseline_that_is_not_a_method(tmp_path):
    with pytest.raises(ValueError, match="baseline 'nobody' is not one of the methods"):
        write_reports(_sweep(), tmp_path, headline=HEADLINE, methods=[BASE], title="t", baseline="nobody")


def test_write_reports_rejects_a_reference_without_a_value(tmp_path):
    with pytest.raises(ValueError, match=r"reference 0 .* lacks \['value'\]"):
        write_reports(_sweep(), tmp_path, headline=HEADLINE, methods=[BASE], title="t",
                      references=[{"reference": "majority class", "target": "rte", "split": "dev",
                                   "metric": "accuracy"}])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_every_metric_gets_a_table_with_differences_and_a_plot(tmp_path):
    rows = (_rows(BASE, {0: 0.80, 1: 0.82, 2: 0.81}, target="mrpc", metric="f1")
            + _rows("steady", {0: 0.84, 1: 0.85, 2: 0.86}, target="mrpc", metric="f1")
            + _rows(BASE, {0: 0.70, 1: 0.72, 2: 0.74}, target="mrpc", metric="accuracy")
            + _rows("steady", {0: 0.75, 1: 0.78, 2: 0.79}, target="mrpc", metric="accuracy"))
    paths = write_reports(rows, tmp_path, headline={"mrpc": ("dev", "f1")}, methods=[BASE, "steady"], title="t",
                          metrics={"mrpc": ["f1", "accuracy"]}, references=[_majority("mrpc", "accuracy", 0.684)])
    table = (tmp_path / "results.md").read_text()
    first, second = table.split("### Other metrics: mrpc accuracy")
    assert "| method | mrpc f1 @10% |" in first and "accuracy @" not in first
    cells = _table_cells(second)
    assert cells[BASE] == ["72.0 ± 2.0"]
    # differences 0.05, 0.06, 0.05: mean 5.33, sd 0.577 -> ± t * 0.333
    half = T_975_DF2 * math.sqrt(1 / 3) / math.sqrt(3) * 1
    assert cells["steady"] == [f"77.3 ± 2.1 (Δ +5.3 [+{5.333 - half:.1f}, +{5.333 + half:.1f}])*"]
    assert cells["*majority class*"] == ["68.4"]
    assert paths["plot-2"] == tmp_path / "scores-2.png" and paths["plot-2"].read_bytes()[:4] == b"\x89PNG"
