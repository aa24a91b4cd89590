"""Pivotal tuning: new tokens' embeddings trained jointly with the adapter (`--train_text_encoder_ti`, the flags of
diffusers' advanced DreamBooth scripts), and their files for diffusers, A1111 and ComfyUI.

What it does, as diffusers' `train_dreambooth_lora_{sd15,sdxl}_advanced.py` (and `--initializer_concept` from its
Flux script) do it:
- each `--token_abstraction` (comma-separated, default "TOK") stands for `--num_new_tokens_per_abstraction` new
  tokens, numbered across abstractions: TOK -> `<s0><s1>`, a second one -> `<s2><s3>`. The abstraction is
  replaced by its tokens in the instance prompt, the captions, the class and the validation prompts, so it never
  reaches the tokenizer; the new tokens are added to every tokenizer (SDXL: both);
- the new rows start as N(0, σ²), σ the std of the encoder's whole embedding matrix, or as the embeddings of
  `--initializer_concept`'s tokens (row j from the concept's token j mod its length; the number of new tokens
  then defaults to the concept's token count);
- after every optimizer step that trained them, the new rows of each encoder are scaled by (σ / std(new rows))^0.1,
  which pulls their spread towards the vocabulary's (diffusers' `retract_embeddings`);
- they train during the first ⌈frac·N⌉ of the run's N optimizer steps (`--train_text_encoder_ti_frac`); after
  that they are frozen bit for bit (no optimizer step, no rescaling). diffusers counts whole epochs instead and
  keeps rescaling the rows after its pivot.

How they train here: the encoder's embedding matrix grows by the new rows but stays frozen in the run's dtype; the
new rows are one fp32 parameter (`NewTokenEmbedding.new_token_rows`) whose values replace the matrix's at the new
ids in the forward. So only they get gradients, optimizer state and EMA (diffusers trains the whole matrix and
copies the old rows back after each step, which costs AdamW state for every row), and they stay fp32 under
fp16/bf16. Being a parameter of the text encoder, they are all-reduced by DDP and saved in checkpoints with the
weights trained outside the adapters (`checkpoints.trained_outside_adapters`).

Files (`PivotalEmbeddings.write`):
- `<output_dir name>_emb.safetensors`, diffusers' advanced scripts' file: `clip_l` (n, 768) and for SDXL `clip_g`
  (n, 1280), every new token's row in token order, read per encoder by
  `pipe.load_textual_inversion(file["clip_l"], token=["<s0>", "<s1>"], text_encoder=..., tokenizer=...)`;
- in `kohya_lora.safetensors`, A1111's bundled embeddings, one per abstraction named by it (the word that triggers
  it in an A1111 prompt): `bundle_emb.TOK.string_to_param.*` (SD 1.x/2.x) or `bundle_emb.TOK.clip_l` and
  `bundle_emb.TOK.clip_g` (SDXL);
- `embeddings/TOK.safetensors` for ComfyUI (`embedding:TOK`; its LoRA loader ignores bundled embeddings) and
  A1111's embeddings folder: `emb_params` (SD 1.x/2.x) or `clip_l` and `clip_g` (SDXL).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from dreamlora.errors import ArgError
from dreamlora.io import atomic_save_file, read_metadata
from pipelines.trainer.order import stable_seed

ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # diffusers', kohya's and A1111's names
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
EMBEDDINGS_DIR = "embeddings"
EMB_SUFFIX = "_emb.safetensors"
META_ABSTRACTIONS = "dreamlora_token_abstraction"  # {"TOK": ["<s0>", "<s1>"]} in the embedding files' header
INIT_DRAW = 0x70697674  # "pivt": the random init's seed tag, beside the (seed, epoch, sample) draws of training
RESCALE_POWER = 0.1  # diffusers' retract_embeddings: rows *= (σ_vocab / σ_rows) ** 0.1 after each step
DEFAULT_TOKENS = 2
ABSTRACTION = re.compile(r"^\w+$")


# --- the tokens and the prompts --------------------------------------------------------------------------------
def parse_abstractions(text: str) -> list[str]:
    """`--token_abstraction`'s comma-separated identifiers; ArgError naming the flag for an empty, repeated or
    non-word one (it is matched as a whole word and names A1111's bundled embedding and ComfyUI's file)."""
    names = [part.strip() for part in str(text).split(",")]
    for name in names:
        if not ABSTRACTION.match(name):
            raise ArgError(f"--token_abstraction {text!r}: {name!r} is not a word (letters, digits and _ only; "
                           f"several are separated by commas)")
    if len(set(names)) != len(names):
        raise ArgError(f"--token_abstraction {text!r} names an identifier twice")
    return names


def token_map(abstractions: list[str], per_abstraction: int) -> dict[str, list[str]]:
    """{abstraction: its new tokens}, numbered across abstractions as diffusers does: <s0><s1>, <s2><s3>, ..."""
    return {name: [f"<s{i * per_abstraction + j}>" for j in range(per_abstraction)]
            for i, name in enumerate(abstractions)}


def _word(name: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)")


def replace_abstractions(text: str | None, mapping: dict[str, list[str] | str]) -> str | None:
    """`text` with each abstraction, as a whole word (case-sensitive: "TOKEN" and "tok" stay), replaced by its
    tokens written together ("<s0><s1>")."""
    if not text:
        return text
    for name, tokens in mapping.items():
        text = _word(name).sub("".join(tokens).replace("\\", "\\\\"), text)
    return text


def occurs(name: str, text: str | None) -> bool:
    return bool(text) and _word(name).search(text) is not None


def concept_ids(tokenizer, concept: str) -> list[int]:
    return list(tokenizer(concept, add_special_tokens=False).input_ids)


def load_tokenizers(path: str, revision: str | None, sdxl: bool) -> dict:
    """The model's CLIP tokenizers by the encoder they feed (no weights are read)."""
    from transformers import CLIPTokenizer

    names = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    return {name: CLIPTokenizer.from_pretrained(path, subfolder=TOKENIZERS[name], revision=revision)
            for name in names}


def check_tokenizers(args, tokenizers: dict, mapping: dict[str, list[str]]) -> None:
    """One ArgError naming the flag: an abstraction that one of the tokenizers already adds as a token of its own
    (special or added: a model with merged embeddings), a new token it already has, or a concept it reads as no
    token. An ordinary vocabulary word is a fine abstraction: it is replaced in the text and never tokenised."""
    for component, tokenizer in tokenizers.items():
        added = {token.lower(): token for token in tokenizer.get_added_vocab()}
        for name, tokens in mapping.items():
            if name.lower() in added:
                raise ArgError(f"--token_abstraction {name!r} is already a token of {TOKENIZERS[component]} "
                               f"({added[name.lower()]!r}): choose another identifier")
            taken = [t for t in tokens if t in tokenizer.get_vocab()]
            if taken:
                raise ArgError(f"--token_abstraction {name!r}: its new token {taken[0]!r} is already a token of "
                               f"{TOKENIZERS[component]} (a model with pivotal tokens merged in?): train on the "
                               f"original base model")
        if args.initializer_concept is not None and not concept_ids(tokenizer, args.initializer_concept):
            raise ArgError(f"--initializer_concept {args.initializer_concept!r} is no token for "
                           f"{TOKENIZERS[component]}: give a word or phrase")


def resolve_flags(args) -> None:
    """The checks `validate` makes before any model loads: the abstractions parse, one occurs in --instance_prompt,
    the tokenizers take the new tokens; and `args.num_new_tokens_per_abstraction` resolved (2, or the concept's
    token count with --initializer_concept), so run.json records the count trained."""
    from pipelines.diffusion.models import is_sdxl_index, read_model_index

    abstractions = parse_abstractions(args.token_abstraction)
    if not any(occurs(name, args.instance_prompt) for name in abstractions):
        raise ArgError(f"--token_abstraction {args.token_abstraction!r} does not occur (as a word) in "
                       f"--instance_prompt {args.instance_prompt!r}: the new tokens would train on no prompt, e.g. "
                       f"--instance_prompt \"a photo of {abstractions[0]} dog\"")
    try:
        sdxl = is_sdxl_index(read_model_index(args.pretrained_model_name_or_path, args.revision))
        tokenizers = load_tokenizers(args.pretrained_model_name_or_path, args.revision, sdxl)
    except (OSError, ValueError) as e:
        raise ArgError(f"--train_text_encoder_ti: the tokenizers of --pretrained_model_name_or_path "
                       f"{args.pretrained_model_name_or_path!r} could not be read: {e}") from None
    if args.num_new_tokens_per_abstraction is None:
        args.num_new_tokens_per_abstraction = DEFAULT_TOKENS if args.initializer_concept is None else max(
            len(concept_ids(t, args.initializer_concept)) for t in tokenizers.values()) or 1
    check_tokenizers(args, tokenizers, token_map(abstractions, args.num_new_tokens_per_abstraction))


def args_token_map(args) -> dict[str, list[str]]:
    return token_map(parse_abstractions(args.token_abstraction), args.num_new_tokens_per_abstraction)


def rewrite_prompts(args, examples: list, folder: str | None = None) -> None:
    """Pivotal tuning: each abstraction replaced by its tokens in --instance_prompt, --class_prompt,
    --validation_prompt and the instance photos' prompts (captions included), in place. An abstraction that no
    photo's prompt holds is an error naming the flag (its tokens would never train). Nothing without
    --train_text_encoder_ti."""
    if not getattr(args, "train_text_encoder_ti", False):
        return
    mapping = args_token_map(args)
    unused = [name for name in mapping if not any(occurs(name, ex.prompt) for ex in examples)]
    if unused:
        raise ArgError(f"--token_abstraction {unused[0]!r} occurs in no prompt of the photos in --instance_data_dir "
                       f"{folder!r} (their captions replace --instance_prompt): its tokens would never train")
    for ex in examples:
        ex.prompt = replace_abstractions(ex.prompt, mapping)
    for flag in ("instance_prompt", "class_prompt", "validation_prompt"):
        setattr(args, flag, replace_abstractions(getattr(args, flag), mapping))


# --- the embedding --------------------------------------------------------------------------------------------
class NewTokenEmbedding(nn.Embedding):
    """A text encoder's token embedding grown by new rows: the matrix (frozen, the run's dtype) has every row, and
    `new_token_rows` (n, d), fp32 and trainable, gives the embeddings of ids `first_id`..`first_id + n - 1`."""

    def __init__(self, weight: torch.Tensor, first_id: int, rows: torch.Tensor, padding_idx: int | None = None):
        super().__init__(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight,
                         _freeze=True, device=weight.device, dtype=weight.dtype)
        self.first_id = first_id
        self.new_token_rows = nn.Parameter(rows.detach().float().clone().to(weight.device))  # (n, d), fp32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        offset = ids - self.first_id
        is_new = (offset >= 0) & (offset < self.new_token_rows.shape[0])
        rows = self.new_token_rows[offset.clamp(0, self.new_token_rows.shape[0] - 1)]  # (..., d), fp32
        return torch.where(is_new.unsqueeze(-1), rows.to(out.dtype), out)

    @torch.no_grad()
    def baked(self) -> nn.Embedding:
        """A plain nn.Embedding holding the trained rows (what a saved model carries)."""
        weight = self.weight.detach().clone()
        weight[self.first_id:self.first_id + self.new_token_rows.shape[0]] = self.new_token_rows.to(weight.dtype)
        return nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=self.padding_idx)


def grown(embedding: nn.Embedding, ids: list[int], rows: torch.Tensor) -> torch.Tensor:
    """The embedding matrix with rows for `ids` (consecutive, at or past its end) set to `rows`, in its dtype;
    built without nn.Embedding's random init, so no draw of the global RNG is spent."""
    old = embedding.weight.detach()
    weight = torch.empty(max(ids) + 1, old.shape[1], dtype=old.dtype, device=old.device)
    weight[:old.shape[0]] = old
    weight[ids] = rows.to(old.device, old.dtype)
    return weight


def add_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` to `tokenizer` as diffusers' `load_textual_inversion` does (`add_tokens`), so a prompt is split the
    same in training and in diffusers; their ids, consecutive at the end of the vocabulary."""
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ValueError(f"the tokenizer already has one of {tokens}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"the new tokens {tokens} got ids {ids}, not consecutive ones")
    return ids


def set_vocab_size(text_encoder: nn.Module, embedding: nn.Embedding) -> None:
    text_encoder.set_input_embeddings(embedding)
    text_encoder.config.vocab_size = embedding.num_embeddings


class PivotalEmbeddings:
    """The new tokens of a run, on every text encoder of `sd` (SD 1.x/2.x: one; SDXL: both): set up, trained
    (`param_groups`, the loop's `before_step`/`after_step`), written (`write`) and folded in (`bake`)."""

    def __init__(self, args, sd):
        self.mapping = args_token_map(args)
        self.tokens = [t for tokens in self.mapping.values() for t in tokens]
        self.concept, self.frac = args.initializer_concept, args.train_text_encoder_ti_frac
        self.train_steps = 0  # `plan`
        self.output_name = Path(args.output_dir).name
        self.encoders: dict[str, nn.Module] = {}
        self.vocab_std: dict[str, float] = {}
        tokenizers = {"text_encoder": sd.tokenizer, "text_encoder_2": sd.tokenizer_2}
        check_tokenizers(args, {c: tokenizers[c] for c in sd.text_encoders}, self.mapping)
        for index, (component, encoder) in enumerate(sd.text_encoders.items()):
            old = encoder.get_input_embeddings()
            matrix = old.weight.detach().float()  # (V, d)
            self.vocab_std[component] = matrix.std().item()
            rows = self.initial_rows(args.seed, index, tokenizers[component], matrix)
            ids = add_tokens(tokenizers[component], self.tokens)
            embedding = NewTokenEmbedding(grown(old, ids, rows), ids[0], rows, old.padding_idx)
            set_vocab_size(encoder, embedding)
            if args.gradient_checkpointing:
                encoder.gradient_checkpointing_enable()
            self.encoders[component] = encoder

    def initial_rows(self, seed: int, index: int, tokenizer, matrix: torch.Tensor) -> torch.Tensor:
        """(n, d) fp32: the concept's embeddings (row j of an abstraction from its token j mod their count), or
        N(0, σ²) from a generator seeded by (seed, encoder index), never the global RNG."""
        if self.concept is not None:
            ids = concept_ids(tokenizer, self.concept)
            return torch.stack([matrix[ids[j % len(ids)]] for tokens in self.mapping.values()
                                for j in range(len(tokens))])
        generator = torch.Generator().manual_seed(stable_seed(seed, INIT_DRAW, index))
        return torch.randn(len(self.tokens), matrix.shape[1], generator=generator) * matrix.std()

    def plan(self, max_steps: int) -> None:
        """Once the adapters are attached (attaching freezes every weight of a model but the adapters', the rows
        included): the rows trainable, during the run's first ⌈frac·max_steps⌉ optimizer steps."""
        for p in self.rows().values():
            p.requires_grad_(True)
        self.train_steps = math.ceil(self.frac * max_steps)

    def rows(self) -> dict[str, nn.Parameter]:
        return {component: encoder.get_input_embeddings().new_token_rows
                for component, encoder in self.encoders.items()}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.rows().values())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """One optimizer group of the new rows (diffusers' advanced scripts: the text encoder's lr)."""
        return [{"params": list(self.rows().values()), "lr": lr, "weight_decay": weight_decay,
                 "adapter": "pivotal", "role": "embedding"}]

    # --- the loop's step hooks (`pipelines.trainer.loop.StepHook`) ---
    def trains_at(self, step: int) -> bool:
        return step <= self.train_steps

    def before_step(self, step: int) -> None:
        """Past the pivot, the rows get no update at all: without a gradient AdamW (and Prodigy) skip them,
        weight decay and moments included, and clipping does not count them."""
        if not self.trains_at(step):
            for p in self.rows().values():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """diffusers' rescaling of the rows that trained: rows *= (σ_vocab / std(rows)) ** 0.1, per encoder."""
        if not self.trains_at(step):
            return
        for component, p in self.rows().items():
            spread = p.std()
            if spread > 0:
                p.mul_((self.vocab_std[component] / spread) ** RESCALE_POWER)

    # --- outputs ---
    def tensors(self) -> dict[str, torch.Tensor]:
        """{"clip_l": (n, d)[, "clip_g": (n, d')]}, every new token's row in token order, fp32."""
        return {ENCODER_KEYS[c]: p.detach().float().cpu().contiguous() for c, p in self.rows().items()}

    def by_abstraction(self) -> dict[str, dict[str, torch.Tensor]]:
        out, start, tensors = {}, 0, self.tensors()
        for name, tokens in self.mapping.items():
            out[name] = {key: t[start:start + len(tokens)].contiguous() for key, t in tensors.items()}
            start += len(tokens)
        return out

    def write(self, output_dir: Path, tool_files: bool = True, kohya_file: Path | None = None) -> dict:
        """The diffusers file; with `tool_files` (not --no_kohya_format) the ComfyUI/A1111 files, and the bundled
        embeddings in `kohya_file` (the kohya LoRA just written; None where the method has no kohya form). Returns
        run.json's `pivotal.files`."""
        meta = {"format": "pt", META_ABSTRACTIONS: json.dumps(self.mapping)}
        diffusers_file = Path(output_dir) / f"{self.output_name}{EMB_SUFFIX}"
        atomic_save_file(self.tensors(), diffusers_file, meta)
        files = {"diffusers": diffusers_file.name, "a1111": None, "comfyui": None}
        if not tool_files:
            return files
        sdxl = "text_encoder_2" in self.encoders
        bundle, folder = {}, Path(output_dir) / EMBEDDINGS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for name, tensors in self.by_abstraction().items():
            if sdxl:  # A1111 tells an SDXL embedding by its clip_l and clip_g; ComfyUI reads each by that key
                bundle.update({f"bundle_emb.{name}.{key}": t for key, t in tensors.items()})
                separate = tensors
            else:
                bundle[f"bundle_emb.{name}.string_to_param.*"] = tensors["clip_l"]
                separate = {"emb_params": tensors["clip_l"]}
            atomic_save_file(separate, folder / f"{name}.safetensors", {"format": "pt"})
        files["comfyui"] = [f"{EMBEDDINGS_DIR}/{name}.safetensors" for name in self.mapping]
        if kohya_file is not None:
            from safetensors.torch import load_file

            atomic_save_file({**load_file(str(kohya_file)), **bundle}, kohya_file, read_metadata(kohya_file))
            files["a1111"] = kohya_file.name
        return files

    def record(self, files: dict) -> dict:
        """run.json's `pivotal` entry."""
        return {"token_abstraction": self.mapping, "init": self.concept or "random",
                "trained_steps": self.train_steps, "trainable_params": self.parameter_count(), "files": files}

    def bake(self) -> None:
        """Fold the trained rows into the matrices (before saving the merged model): plain CLIP encoders whose
        tokenizers (already grown) and matrices know the new tokens."""
        for encoder in self.encoders.values():
            set_vocab_size(encoder, encoder.get_input_embeddings().baked())


# --- sampling: a run's embeddings into a pipeline ---------------------------------------------------------------
def embedding_file(run_dir: Path) -> Path | None:
    """The diffusers embedding file a pivotal run wrote in `run_dir` (None for another run)."""
    found = [p for p in sorted(Path(run_dir).glob(f"*{EMB_SUFFIX}")) if META_ABSTRACTIONS in read_metadata(p)]
    if len(found) > 1:
        raise ValueError(f"{run_dir} holds several embedding files ({', '.join(p.name for p in found)})")
    return found[0] if found else None


def load_embeddings(pipe, file: Path, name: str) -> dict[str, str]:
    """The new tokens of `file` into `pipe`'s tokenizers and text encoders (copies of the tokenizers: the originals
    come back with `unload_embeddings`), under the trained names, or `<name>.s0`... when a name is taken (a second
    pivotal adapter). Returns {abstraction: the tokens written together} for `replace_abstractions`."""
    import copy

    from safetensors.torch import load_file

    mapping = json.loads(read_metadata(file)[META_ABSTRACTIONS])
    tensors = load_file(str(file))
    components = [c for c in ENCODER_KEYS if getattr(pipe, c, None) is not None]
    missing = [ENCODER_KEYS[c] for c in components if ENCODER_KEYS[c] not in tensors]
    if missing:
        raise ValueError(f"{file} has no {missing[0]} embeddings: it was trained on another kind of model")
    tokens = [t for ts in mapping.values() for t in ts]
    vocab = getattr(pipe, TOKENIZERS[components[0]]).get_vocab()
    if any(t in vocab for t in tokens):
        tokens = [f"<{name}.{t.strip('<>')}>" for t in tokens]
    saved = pipe.__dict__.setdefault("_dreamlora_embeddings", [])
    for component in components:
        encoder, tokenizer_name = getattr(pipe, component), TOKENIZERS[component]
        rows = tensors[ENCODER_KEYS[component]]
        if rows.shape != (len(tokens), encoder.get_input_embeddings().embedding_dim):
            raise ValueError(f"{file}: {ENCODER_KEYS[component]} is {tuple(rows.shape)}, this model's "
                             f"{component} takes ({len(tokens)}, {encoder.get_input_embeddings().embedding_dim})")
        saved.append((component, getattr(pipe, tokenizer_name), encoder.get_input_embeddings()))
        tokenizer = copy.deepcopy(getattr(pipe, tokenizer_name))
        ids = add_tokens(tokenizer, tokens)
        old = encoder.get_input_embeddings()
        set_vocab_size(encoder, nn.Embedding.from_pretrained(grown(old, ids, rows), freeze=True,
                                                             padding_idx=old.padding_idx))
        setattr(pipe, tokenizer_name, tokenizer)
    out, start = {}, 0
    for abstraction, trained in mapping.items():
        out[abstraction] = "".join(tokens[start:start + len(trained)])
        start += len(trained)
    return out


def unload_embeddings(pipe) -> None:
    """Undo every `load_embeddings` on `pipe`: its tokenizers and embedding matrices as they were."""
    for component, tokenizer, embedding in reversed(pipe.__dict__.pop("_dreamlora_embeddings", [])):
        setattr(pipe, TOKENIZERS[component], tokenizer)
        set_vocab_size(getattr(pipe, component), embedding)


def merged_abstractions(applied: list[dict]) -> dict[str, str]:
    """{abstraction: tokens} over the adapters `apply_adapters` loaded; one abstraction in two adapters is an error."""
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for row in applied:
        for abstraction, tokens in (row.get("token_abstraction") or {}).items():
            if abstraction in out:
                raise ValueError(f"--adapter {row['path']!r} and {owner[abstraction]!r} both trained the token "
                                 f"abstraction {abstraction!r}: a prompt cannot tell them apart")
            out[abstraction], owner[abstraction] = tokens, row["path"]
    return out
