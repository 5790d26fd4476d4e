"""Layer-wise concept tokens (ED-LoRA / P+ style, CIDM §4.1 "task-specific knowledge").

A concept `<name>` is written as `n_slots` tokens (the first random, the rest from the class word, as the official
code does with `<dog1> <dog2>`), and each slot has one token per cross-attention layer: `<name.s.l>`. Binding a prompt
for layer l replaces `<name>` by `<name.0.l> <name.1.l> …`; cross-attention layer l reads the text encoded for layer l.

The new embedding rows live in `ConceptEmbedding`, one Parameter per concept keyed by its name (as peft keeps one
tensor per adapter), beside the frozen base table: the base vocabulary cannot change, by construction.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .templates import OBJECT_TEMPLATES

CONCEPT_REF = re.compile(r"<([^<>\s]+)>")  # `<name>` in a prompt


def token_strings(name: str, n_slots: int, n_layers: int) -> list[str]:
    """Tokenizer entries of a concept, slot-major: row s·L + l is slot s of layer l."""
    return [f"<{name}.{s}.{l}>" for s in range(n_slots) for l in range(n_layers)]


class ConceptEmbedding(nn.Module):
    """The text encoder's token embedding plus per-concept layer-wise rows (the only trainable text parameters).

    With two text encoders (SDXL), both read one row per token from the same `concepts` table, each its own columns.
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.concepts = nn.ParameterDict()  # name -> (n_slots · n_layers, D of all text encoders together)
        self.columns = slice(0, base.embedding_dim)  # this text encoder's part of a row
        self.first_id: dict[str, int] = {}  # name -> tokenizer id of its first row

    @property
    def weight(self) -> torch.Tensor:  # what code that inspects an nn.Embedding expects
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        for name, rows in self.concepts.items():
            offset = input_ids - self.first_id[name]
            mine = (offset >= 0) & (offset < rows.shape[0])
            if mine.any():
                picked = rows[offset.clamp(0, rows.shape[0] - 1)][..., self.columns]
                out = torch.where(mine[..., None], picked.to(out.dtype), out)
        return out


TEXT_TOWERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))  # SD: the first; SDXL: both


class ConceptTokens:
    """Adds concepts' layer-wise tokens to a pipeline's tokenizer(s) and text encoder(s), and binds prompts per layer.

    SDXL has two text encoders: a concept row holds both encoders' parts side by side (768 + 1280 columns), the
    layer-wise text is both encoders' penultimate hidden states concatenated (as SDXL's pipeline does), and the pooled
    embedding (text encoder 2) of the prompt bound for layer 0 rides in one extra slot after the L layers, which the
    UNet hook of `attention.install_processors` turns into SDXL's added conditions.
    """

    def __init__(self, pipe, n_layers: int):
        self.pipe = pipe
        self.n_layers = n_layers
        self.towers = [(tok, enc) for tok, enc in TEXT_TOWERS if getattr(pipe, enc, None) is not None]
        self.embeddings: list[ConceptEmbedding] = []
        shared = nn.ParameterDict()
        start = 0
        for tok, enc in self.towers:
            text_encoder = getattr(pipe, enc)
            embedding = text_encoder.get_input_embeddings()
            if not isinstance(embedding, ConceptEmbedding):  # first use of this pipeline: keep its pristine tokenizer
                embedding = ConceptEmbedding(embedding)
                embedding.base_tokenizer = copy.deepcopy(getattr(pipe, tok))
                text_encoder.set_input_embeddings(embedding)
            # a pipeline shared by several libraries (one per app session): start from the base vocabulary
            setattr(pipe, tok, copy.deepcopy(embedding.base_tokenizer))
            embedding.concepts = shared
            embedding.columns = slice(start, start + embedding.embedding_dim)
            embedding.first_id.clear()
            start += embedding.embedding_dim
            self.embeddings.append(embedding)
        self.width = start  # D of a concept row
        self.embedding = self.embeddings[0]
        self.base_tokenizer = self.embedding.base_tokenizer
        self.pooled = len(self.towers) > 1  # SDXL: a pooled embedding for the UNet's added conditions
        self.slots: dict[str, int] = {}  # name -> n_slots

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def add(self, name: str, rows: torch.Tensor) -> None:
        """Register a concept with its embedding rows (n_slots · n_layers, D)."""
        n_slots, rem = divmod(rows.shape[0], self.n_layers)
        if rem or n_slots < 1:
            raise ValueError(f"concept {name!r} has {rows.shape[0]} token rows; expected a multiple of the "
                             f"{self.n_layers} cross-attention layers of this model (was it learned on another base?)")
        if rows.shape[1] != self.width:
            raise ValueError(f"concept {name!r} has token width {rows.shape[1]}; this text encoder has "
                             f"{self.width} (was it learned on another base?)")
        if name in self.slots:
            self.remove(name)
        strings = token_strings(name, n_slots, self.n_layers)
        for (tok, _), embedding in zip(self.towers, self.embeddings):
            tokenizer = getattr(self.pipe, tok)
            tokenizer.add_tokens(strings)
            ids = tokenizer.convert_tokens_to_ids(strings)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise RuntimeError(f"tokenizer gave non-contiguous ids to the tokens of {name!r}")
            embedding.first_id[name] = ids[0]
        device = self.embedding.base.weight.device
        self.embedding.concepts[name] = nn.Parameter(rows.detach().clone().to(device, torch.float32),
                                                     requires_grad=False)
        self.slots[name] = n_slots

    def remove(self, name: str) -> None:
        """Forget a concept: rebuild the tokenizers from the base ones and re-add the others."""
        keep = {n: self.embedding.concepts[n].data for n in self.slots if n != name}
        for (tok, _), embedding in zip(self.towers, self.embeddings):
            setattr(self.pipe, tok, copy.deepcopy(embedding.base_tokenizer))
            embedding.first_id.clear()
        for n in list(self.embedding.concepts):
            del self.embedding.concepts[n]
        self.slots.clear()
        for n, rows in keep.items():
            self.add(n, rows)

    def vocab_norm(self) -> float:
        """Mean norm of the base vocabulary's rows (all text encoders' parts together): the embedding-norm stop's
        reference."""
        return sum(e.base.weight.detach().float().norm(dim=-1).mean().item() ** 2 for e in self.embeddings) ** 0.5

    def input_embeddings(self, prompt: str, layer: int) -> torch.Tensor:
        """The rows the text encoder(s) read for the layer-`layer` bound prompt, without BOS/EOS: (N, D)."""
        parts = []
        for (tok, _), embedding in zip(self.towers, self.embeddings):
            ids = getattr(self.pipe, tok)(self.bind(prompt, layer)).input_ids[1:-1]
            parts.append(embedding(torch.tensor(ids, device=embedding.base.weight.device)))
        return torch.cat(parts, -1)

    def initial_rows(self, class_word: str, n_slots: int = 2, sigma: float = 0.013,
                     generator: torch.Generator | None = None, first: str = "class+noise") -> torch.Tensor:
        """Slots copied to every layer: the others the class word's embedding; the first N(0, σ²) (first="random",
        the official code) or the class word plus that noise (first="class+noise", default: a purely random token
        is far outside what a small text encoder ever saw, and the toy world's images collapsed to noise)."""
        ids = self.base_tokenizer(class_word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"class word {class_word!r} is empty after tokenizing; give a word such as 'dog'")
        class_vec = torch.cat([e.base.weight.detach().float().cpu()[ids].mean(0)  # multi-token word: the mean
                               for e in self.embeddings])
        noise = torch.randn(self.width, generator=generator) * sigma
        if first not in ("random", "class+noise"):
            raise ValueError(f"first-token init must be 'random' or 'class+noise', got {first!r}")
        slot_rows = [noise if first == "random" else class_vec + noise] + [class_vec] * (n_slots - 1)
        return torch.stack([row for row in slot_rows for _ in range(self.n_layers)])

    # --------------------------------------------------------------------------------------------------------
    # prompts

    def check_prompt(self, prompt: str) -> list[str]:
        """Concepts a prompt names; an unknown `<name>` is an error that lists the known ones."""
        names = CONCEPT_REF.findall(prompt)
        unknown = [n for n in names if n not in self.slots]
        if unknown:
            known = ", ".join(f"<{n}>" for n in self.slots) or "none yet: learn one first"
            raise ValueError(f"unknown concept {', '.join(f'<{n}>' for n in unknown)} in the prompt; "
                             f"known concepts: {known}")
        return names

    def bind(self, prompt: str, layer: int) -> str:
        """The prompt for cross-attention layer `layer`: `<name>` -> `<name.0.l> <name.1.l> …`."""
        def expand(match):
            name = match.group(1)
            return " ".join(f"<{name}.{s}.{layer}>" for s in range(self.slots[name]))

        self.check_prompt(prompt)
        return CONCEPT_REF.sub(expand, prompt)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Layer-wise text embeddings of prompts: (B, L, N, D); each layer's copy of the prompt encoded on its own.

        SDXL: (B, L + 1, N, D), the last slot carrying the pooled embedding in [:, L, 0, :P] (see the class).
        """
        bound = [self.bind(p, l) for p in prompts for l in range(self.n_layers)]  # B·L prompts, prompt-major
        parts, pooled = [], None
        for tok, enc in self.towers:
            tokenizer, text_encoder = getattr(self.pipe, tok), getattr(self.pipe, enc)
            ids = tokenizer(bound, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(text_encoder.device)
            out = text_encoder(ids, output_hidden_states=self.pooled)
            parts.append(out.hidden_states[-2] if self.pooled else out[0])  # SDXL: penultimate; SD: last
            if self.pooled:
                pooled = out[0].view(len(prompts), self.n_layers, -1)[:, 0]  # the layer-0 bound prompt's
        hidden = torch.cat(parts, -1)
        hidden = hidden.view(len(prompts), self.n_layers, *hidden.shape[1:])
        if pooled is not None:
            slot = hidden.new_zeros(len(prompts), 1, *hidden.shape[2:])
            slot[:, 0, 0, :pooled.shape[-1]] = pooled
            hidden = torch.cat([hidden, slot], 1)
        return hidden

    def concept_embeddings(self, name: str, space: str = "token") -> torch.Tensor:
        """A task's concept embeddings per layer, one per slot (Eq. 3's ê): (S, L, D).

        space="token": the layer-wise token rows themselves. space="encoded": the text encoder's output at the
        concept's positions in a neutral template, "a photo of a <name>": encoded alone, right after BOS, any two
        concepts look alike to this small causal encoder, because position dominates its hidden states.
        """
        n_slots = self.slots[name]
        if space == "token":
            return self.rows(name).detach().view(n_slots, self.n_layers, -1)
        template = OBJECT_TEMPLATES[0]
        hidden = self.encode([template.format(f"<{name}>")])[0, :self.n_layers]  # (L, N, D)
        first = len(self.pipe.tokenizer(template.format("x")).input_ids) - 2  # the concept's first slot
        return hidden[:, first:first + n_slots].transpose(0, 1)

    def rows(self, name: str) -> torch.Tensor:
        return self.embedding.concepts[name]

    def single_vectors(self, name: str) -> list[torch.Tensor]:
        """The concept for a plain pipeline, where every cross-attention layer reads the same text: per slot, the
        mean of its L layer-wise rows (the one vector nearest to all of them in least squares), split by text
        encoder: [(n_slots, D_i)]. On the toy world no single layer's row is best for every concept, and a layer's
        index does not carry from one base to another (README, "A concept in a plain diffusers pipeline")."""
        mean = self.rows(name).detach().float().cpu().view(self.slots[name], self.n_layers, -1).mean(1)
        return [mean[:, e.columns].clone() for e in self.embeddings]
