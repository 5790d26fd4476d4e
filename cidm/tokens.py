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

CONCEPT_REF = re.compile(r"<([^<>\s]+)>")  # `<name>` in a prompt


def token_strings(name: str, n_slots: int, n_layers: int) -> list[str]:
    """Tokenizer entries of a concept, slot-major: row s·L + l is slot s of layer l."""
    return [f"<{name}.{s}.{l}>" for s in range(n_slots) for l in range(n_layers)]


class ConceptEmbedding(nn.Module):
    """The text encoder's token embedding plus per-concept layer-wise rows (the only trainable text parameters)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.concepts = nn.ParameterDict()  # name -> (n_slots · n_layers, D)
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
                out = torch.where(mine[..., None], rows[offset.clamp(0, rows.shape[0] - 1)].to(out.dtype), out)
        return out


class ConceptTokens:
    """Adds concepts' layer-wise tokens to a pipeline's tokenizer and text encoder, and binds prompts per layer."""

    def __init__(self, pipe, n_layers: int):
        self.pipe = pipe
        self.n_layers = n_layers
        embedding = pipe.text_encoder.get_input_embeddings()
        if not isinstance(embedding, ConceptEmbedding):  # first use of this pipeline: keep its pristine tokenizer
            embedding = ConceptEmbedding(embedding)
            embedding.base_tokenizer = copy.deepcopy(pipe.tokenizer)
            pipe.text_encoder.set_input_embeddings(embedding)
        self.embedding = embedding
        self.base_tokenizer = embedding.base_tokenizer
        # a pipeline shared by several libraries (one per app session): start from the base vocabulary
        pipe.tokenizer = copy.deepcopy(self.base_tokenizer)
        embedding.concepts = nn.ParameterDict()
        embedding.first_id.clear()
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
        if rows.shape[1] != self.embedding.embedding_dim:
            raise ValueError(f"concept {name!r} has token width {rows.shape[1]}; this text encoder has "
                             f"{self.embedding.embedding_dim} (was it learned on another base?)")
        if name in self.slots:
            self.remove(name)
        tokenizer = self.pipe.tokenizer
        strings = token_strings(name, n_slots, self.n_layers)
        tokenizer.add_tokens(strings)
        ids = tokenizer.convert_tokens_to_ids(strings)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise RuntimeError(f"tokenizer gave non-contiguous ids to the tokens of {name!r}")
        device = self.embedding.base.weight.device
        self.embedding.concepts[name] = nn.Parameter(rows.detach().clone().to(device, torch.float32),
                                                     requires_grad=False)
        self.embedding.first_id[name] = ids[0]
        self.slots[name] = n_slots

    def remove(self, name: str) -> None:
        """Forget a concept: rebuild the tokenizer from the base one and re-add the others."""
        keep = {n: self.embedding.concepts[n].data for n in self.slots if n != name}
        self.pipe.tokenizer = copy.deepcopy(self.base_tokenizer)
        self.embedding.concepts = nn.ParameterDict()
        self.embedding.first_id.clear()
        self.slots.clear()
        for n, rows in keep.items():
            self.add(n, rows)

    def initial_rows(self, class_word: str, n_slots: int = 2, sigma: float = 0.013,
                     generator: torch.Generator | None = None, first: str = "class+noise") -> torch.Tensor:
        """Slots copied to every layer: the others the class word's embedding; the first N(0, σ²) (first="random",
        the official code) or the class word plus that noise (first="class+noise", default: a purely random token
        is far outside what a small text encoder ever saw, and the toy world's images collapsed to noise)."""
        ids = self.base_tokenizer(class_word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"class word {class_word!r} is empty after tokenizing; give a word such as 'dog'")
        base = self.embedding.base.weight.detach().float().cpu()
        class_vec = base[ids].mean(0)  # a multi-token class word: the mean of its pieces
        noise = torch.randn(base.shape[1], generator=generator) * sigma
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
        """Layer-wise text embeddings of prompts: (B, L, N, D); each layer's copy of the prompt encoded on its own."""
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        bound = [self.bind(p, l) for p in prompts for l in range(self.n_layers)]  # B·L prompts, prompt-major
        ids = tokenizer(bound, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        hidden = text_encoder(ids)[0]  # (B·L, N, D)
        return hidden.view(len(prompts), self.n_layers, *hidden.shape[1:])

    def concept_embeddings(self, name: str, space: str = "token") -> torch.Tensor:
        """A task's concept embedding per layer, its slots averaged (Eq. 3's ê): (L, D).

        space="token": the layer-wise token rows themselves. space="encoded": the text encoder's output at the
        concept's positions in a neutral template, "a photo of a <name>": encoded alone, right after BOS, any two
        concepts look alike to this small causal encoder, because position dominates its hidden states.
        """
        n_slots = self.slots[name]
        if space == "token":
            return self.rows(name).detach().view(n_slots, self.n_layers, -1).mean(0)
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        template = "a photo of a {}"
        prompts = [self.bind(template.format(f"<{name}>"), l) for l in range(self.n_layers)]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        hidden = text_encoder(ids)[0]  # (L, N, D)
        first = len(tokenizer(template.format("x")).input_ids) - 2  # the concept's first slot
        return hidden[:, first:first + n_slots].mean(1)

    def rows(self, name: str) -> torch.Tensor:
        return self.embedding.concepts[name]
