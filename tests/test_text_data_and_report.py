"""Text data readers, classification metrics, and the sweep's comparison report."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from text_helpers import SST2_DEV, SST2_TRAIN, build_tiny_text_model

from dreamlora.errors import DataError
from eval.classification import classification_metrics
from eval.text_report import first_step_reaching, mean_curve, write_report
from pipelines.text.data import Columns, PadCollator, read_examples


def test_metrics_match_hand_computation():
    # binary: tp=3 fn=1 fp=2 tn=4 -> MCC = (3*4 - 2*1) / sqrt(5*4*6*5)
    actual = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    predicted = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    m = classification_metrics(predicted, actual, 2)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["mcc"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))
    f1_pos, f1_neg = 2 * 3 / (2 * 3 + 2 + 1), 2 * 4 / (2 * 4 + 1 + 2)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    # three classes, class 2 never predicted: its F1 is 0 and still counts (it occurs in the labels)
    m = classification_metrics([0, 1, 1, 0], [0, 1, 2, 2], 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert classification_metrics([0, 0], [1, 1], 2)["mcc"] == 0.0  # undefined -> 0, not NaN


def test_every_format_reads_the_same_examples(tmp_path):
    rows = [("a \"quoted\" film", "1"), ("it's bad", "0"), ("fine, ok", "1")]
    (tmp_path / "d.csv").write_text('text,label\n"a ""quoted"" film",1\nit\'s bad,0\n"fine, ok",1\n')
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in rows))
    (tmp_path / "d.txt").write_text("".join(f"{y} {t}\n" for t, y in rows))
    for suffix in ("csv", "tsv", "jsonl", "txt"):
        examples, labels = read_examples(tmp_path / f"d.{suffix}", "--train_file", None, Columns())
        assert examples.texts == [t for t, _ in rows], suffix
        assert labels == ["0", "1"] and examples.labels == [1, 0, 1] and examples.pairs is None


def test_glue_tsv_pairs_with_stray_quotes_and_numeric_label_order(tmp_path):
    data = tmp_path / "rte.tsv"
    data.write_text('sentence1\tsentence2\tlabel\tidx\nHe said "hi.\tA greeting.\t10\t0\nX\tY\t2\t1\n')
    examples, labels = read_examples(data, "--train_file", None, Columns())
    assert examples.texts == ['He said "hi.', "X"] and examples.pairs == ["A greeting.", "Y"]
    assert labels == ["2", "10"] and examples.labels == [1, 0]  # numeric order, not "10" < "2"
    only_first, _ = read_examples(data, "--train_file", None, Columns(text="sentence2"))
    assert only_first.pairs is None and only_first.texts == ["A greeting.", "Y"]


def test_label_text_lines_refuse_column_flags(tmp_path):
    with pytest.raises(DataError, match="no named columns"):
        read_examples(SST2_TRAIN, "--train_file", None, Columns(text="sentence"))


def test_a_label_with_an_empty_text_is_an_example(tmp_path, caplog):
    """Real data has such lines (CR, a public sentiment set, has one in 3,775): an empty text is valid input,
    counted in one warning, and never stops the run."""
    rough = tmp_path / "rough.txt"
    rough.write_text("1 good film\n0\n\n0 \t\n1 fine\n")
    with caplog.at_level(logging.WARNING):
        examples, labels = read_examples(rough, "--train_file", None, Columns())
    assert examples.texts == ["good film", "", "", "fine"] and examples.labels == [1, 0, 0, 1]
    assert labels == ["0", "1"]
    assert "2 lines have a label and an empty text" in caplog.text


def test_collator_pads_to_the_longest_and_masks():
    batch = PadCollator(pad_token_id=9)([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
                                         {"input_ids": [4], "attention_mask": [1], "labels": 0}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["labels"].tolist() == [1, 0]
    left = PadCollator(9, "left")([{"input_ids": [1, 2], "labels": 0}, {"input_ids": [4], "labels": 1}])
    assert left["input_ids"].tolist() == [[1, 2], [9, 4]]


def fake_run(folder, method, lr, seed, curve, params=100, report=None):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({
        "task": "text-classification", "finished": True, "method": method,
        "args": {"learning_rate": lr, "seed": seed, "rank": 8},
        "eval_accuracy": curve[-1][1], "eval_macro_f1": 0.5, "eval_mcc": 0.1, "adapter_params": params,
        "head_params": 10, "train_time_s": 2.0, "steps": curve[-1][0],
        **({"method_report": {"model": report}} if report else {})}))
    (folder / "eval.jsonl").write_text("".join(json.dumps({"event": "eval", "step": s, "accuracy": a}) + "\n"
                                               for s, a in curve))


def test_report_picks_best_lr_measures_spread_and_steps_to_reach_lora(tmp_path):
    fake_run(tmp_path / "l1", "lora", 1e-3, 0, [(10, 0.5), (20, 0.70)])
    fake_run(tmp_path / "l2", "lora", 1e-3, 1, [(10, 0.6), (20, 0.80)])
    fake_run(tmp_path / "l3", "lora", 1e-2, 0, [(10, 0.5), (20, 0.60)])
    fake_run(tmp_path / "l4", "lora", 1e-2, 1, [(10, 0.5), (20, 0.60)])
    fake_run(tmp_path / "p1", "loraplus", 1e-3, 0, [(10, 0.76), (20, 0.80)], params=50)
    fake_run(tmp_path / "p2", "loraplus", 1e-3, 1, [(10, 0.74), (20, 0.78)], params=50)
    text = write_report(tmp_path)
    summary = json.loads((tmp_path / "report.json").read_text())
    lora, plus = summary["methods"]
    assert lora["best_lr"] == 1e-3 and lora["accuracy_mean"] == pytest.approx(0.75)
    assert lora["accuracy_std"] == pytest.approx(0.05) and lora["lr_spread_points"] == pytest.approx(15.0)
    assert lora["steps_to_lora_final"] == 20 and plus["steps_to_lora_final"] == 10  # 0.75 reached at step 10
    assert plus["lr_spread_points"] == 0.0 and plus["adapter_params"] == 50
    assert "| loraplus | 0.001 | 79.00 ± 1.00 |" in text
    assert (tmp_path / "accuracy_vs_step.png").stat().st_size > 0 and (tmp_path / "accuracy_vs_lr.png").is_file()


def test_report_shows_each_methods_rank_and_final_parameters(tmp_path):
    """AdaLoRA's final ranks and kept parameters, ReLoRA's effective rank, --rank otherwise."""
    fake_run(tmp_path / "l", "lora", 1e-3, 0, [(10, 0.7)])
    fake_run(tmp_path / "a", "adalora", 1e-3, 0, [(10, 0.7)], params=150,
             report={"rank_per_layer": {"q": 6, "v": 10}, "final_params": 90})
    fake_run(tmp_path / "r", "relora", 1e-3, 0, [(10, 0.7)], report={"rank_per_layer": {"q": 21, "v": 23}})
    text = write_report(tmp_path)
    assert "| lora | 0.001 | 70.00 ± 0.00 | 0.5000 | 0.1000 | 100 | 8.0 |" in text
    assert "| adalora | 0.001 | 70.00 ± 0.00 | 0.5000 | 0.1000 | 150 (90) | 8.0 |" in text
    assert "| relora | 0.001 | 70.00 ± 0.00 | 0.5000 | 0.1000 | 100 | 22.0 |" in text


def test_curve_helpers():
    runs = [{"curve": [(1, 0.2), (2, 0.4), (3, 0.9)]}, {"curve": [(1, 0.4), (3, 0.7)]}]
    assert mean_curve(runs) == [(1, pytest.approx(0.3)), (3, pytest.approx(0.8))]
    assert first_step_reaching([(1, 0.3), (3, 0.8)], 0.8) == 3 and first_step_reaching([(1, 0.3)], 0.5) is None


def test_sweep_runs_the_grid_skips_finished_runs_and_reports(tmp_path):
    model = build_tiny_text_model("bert", tmp_path / "bert")
    command = [sys.executable, "-m", "pipelines.text_sweep", "--output_dir", str(tmp_path / "sweep"), "--methods",
               "lora,singlora", "--learning_rates", "5e-3", "--seeds", "0", "--method_flags", "singlora=--rank 2",
               "--", "--model_name_or_path", str(model),
               "--train_file", str(SST2_TRAIN), "--validation_file", str(SST2_DEV), "--max_train_steps", "2",
               "--eval_steps", "1", "--per_device_train_batch_size", "4", "--max_length", "32", "--report_to", "none"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "| lora | 0.005 |" in report and "| singlora | 0.005 |" in report
    ranks = {m: json.loads((tmp_path / "sweep" / f"{m}_lr0.005_s0" / "run.json").read_text())["args"]["rank"]
             for m in ("lora", "singlora")}
    assert ranks == {"lora": 8, "singlora": 2}  # --method_flags reach that method's runs only
    first = (tmp_path / "sweep" / "lora_lr0.005_s0" / "run.json").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (tmp_path / "sweep" / "lora_lr0.005_s0" / "run.json").stat().st_mtime_ns == first
    curve = [json.loads(x) for x in (tmp_path / "sweep" / "lora_lr0.005_s0" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2] and np.isfinite([r["accuracy"] for r in curve]).all()


def test_sweep_refuses_flags_it_owns(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipelines.text_sweep", "--output_dir", str(tmp_path), "--",
                           "--learning_rate", "1e-3", "--validation_file", "x"], capture_output=True, text=True)
    assert done.returncode == 2 and "set by the sweep itself" in done.stderr


def test_a_line_that_is_not_utf8_is_read_as_windows_1252_with_one_warning(tmp_path, caplog):
    """TREC-6's training file has one Latin-1 byte (line 66: 'sister\\xf0city'); reading it crashed with a
    UnicodeDecodeError traceback. Each other line keeps its UTF-8; the captions of the image trainer alike."""
    from pipelines.diffusion.data import read_captions
    from pipelines.text.data import read_rows

    data = tmp_path / "train.txt"
    data.write_bytes("0 café au lait\n".encode() + b"1 a sister\xf0city\n" + "0 naïve\n".encode())
    with caplog.at_level(logging.WARNING):
        rows = read_rows(data, "label_text", "--train_file")
    assert [r["text"] for _, r in rows] == ["café au lait", "a sisterðcity", "naïve"]
    warnings = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert warnings == [f"{data}: 1 lines are not UTF-8 (the first: line 2); they were read as Windows-1252"]

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_bytes(b"a photo of sks d\xe9cor")
    assert read_captions(tmp_path)["a.png"] == "a photo of sks décor"
