"""The long-context study's tasks and measurements: does the memory carry anything across segments?

Every measurement here reads a model through its ``forward`` alone (MM-Rec or a peer), in eval
mode, float32 logits, each row from a fresh state.

* **Loss by position** (``loss_by_position``): held-out nats and bits per byte of the tokens
  predicted at positions [0, 512), [512, 1k), [1k, 2k), ... of long rows. A model that uses long
  context keeps improving at later positions; one that forgets plateaus.
* **Loss by offset inside a segment** (``loss_by_offset``): the same, by p mod L over the
  positions after the first segment. MM-Rec's level-1 memory is block-diagonal over segments, so
  a rise at small offsets (a sawtooth) says the first tokens of a segment miss the previous one.
* **Passkey retrieval** (``passkey_batch``): a five-digit key hidden at a given depth of filler
  text, asked for at the end; the answer's digits are the only labels.
* **MQAR beyond a segment** (``far_mqar_batch``): Zoology's multi-query recall with every query
  at least ``min_query_position`` tokens into the row, so with ``min_query_position`` = the
  segment length no query shares a segment with the key-value pairs it asks about.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mm_rec_train.evaluation import bits_per_byte

IGNORE_INDEX = -100
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = " What is the pass key? The pass key is "


# ----------------------------------------------------------------------------- loss by position

def position_buckets(length: int, first: int = 512) -> List[Tuple[int, int]]:
    """[(0, first), (first, 2 first), (2 first, 4 first), ...] up to ``length`` (the last is cut there)."""
    if length <= 0 or first <= 0:
        raise ValueError(f"length and first must be positive, got {length} and {first}")
    buckets, start, end = [], 0, first
    while start < length:
        buckets.append((start, min(end, length)))
        start, end = end, 2 * end
    return buckets


@torch.no_grad()
def per_position_nats(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[T] float64: the nats of the token at each position summed over ``rows`` [N, T], predicted
    from the tokens before it in its row. Position 0 is never predicted (0 there)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=device)
    for batch in rows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nats = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [b, T-1]
        total[1:] += nats.double().sum(0)
    model.train(was_training)
    return total.cpu()


def per_position_bytes(rows: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor:
    """[T] long: the UTF-8 bytes of the token at each position summed over ``rows`` (0 at position 0)."""
    counts = byte_lengths[rows].sum(0)
    counts[0] = 0
    return counts


def bucket_metrics(nats: torch.Tensor, n_bytes: torch.Tensor, rows: int,
                   buckets: Sequence[Tuple[int, int]]) -> List[Dict[str, float]]:
    """Per bucket [start, end): loss (nats per predicted token), bits per byte, tokens, bytes,
    from per-position sums ``nats`` and ``n_bytes`` [T] over ``rows`` rows."""
    out = []
    for start, end in buckets:
        predicted = range(max(start, 1), end)  # position 0 is context only
        tokens = rows * len(predicted)
        total = float(nats[max(start, 1):end].sum())
        size = int(n_bytes[max(start, 1):end].sum())
        out.append({"start": start, "end": end, "tokens": tokens, "bytes": size,
                    "loss": total / tokens if tokens else math.nan,
                    "bits_per_byte": bits_per_byte(total, size)})
    return out


def loss_by_position(model, rows: torch.Tensor, byte_lengths: torch.Tensor, first: int = 512,
                     batch_size: int = 8) -> List[Dict[str, float]]:
    """``bucket_metrics`` of ``rows`` [N, T] over ``position_buckets(T, first)``."""
    nats = per_position_nats(model, rows, batch_size)
    return bucket_metrics(nats, per_position_bytes(rows, byte_lengths), len(rows), position_buckets(rows.shape[1], first))


def loss_by_offset(nats: torch.Tensor, rows: int, segment_length: int) -> torch.Tensor:
    """[L] float64: mean nats at each offset p mod L over the positions p >= L (the segments after
    the first), from per-position sums ``nats`` [T] over ``rows`` rows."""
    L = segment_length
    T = nats.shape[0]
    if T < 2 * L:
        raise ValueError(f"rows of {T} tokens hold no full segment after the first (segment_length={L})")
    full = (T // L) * L
    by_segment = nats[L:full].view(-1, L)  # [segments after the first, L]
    return by_segment.sum(0) / (rows * by_segment.shape[0])


# ----------------------------------------------------------------------------- passkey retrieval

def _tokens(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_batch(tokenizer, length: int, batch_size: int, generator: torch.Generator,
                  depth: Optional[float] = None, digits: int = 5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of passkey rows of exactly ``length`` tokens.

    Row: filler, then "The pass key is K. Remember it. K is the pass key." at ``depth`` (0: the
    start, 1: just before the question; None: a uniform depth per row), more filler, and
    " What is the pass key? The pass key is K". Returns (input_ids [B, T], labels [B, T] in the
    HF convention (shifted inside the model): the key's tokens at the end, IGNORE_INDEX elsewhere,
    depth [B]: where the key sentence starts, as a fraction of the filler).
    """
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    filler = _tokens(tokenizer, FILLER * 8)
    rows, labels, depths = [], [], []
    for _ in range(batch_size):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
        needle = _tokens(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = _tokens(tokenizer, QUESTION)
        answer = _tokens(tokenizer, key)
        space = length - len(needle) - len(question) - len(answer)
        if space < 0:
            raise ValueError(f"length {length} cannot hold the passkey's {length - space} tokens")
        at = depth if depth is not None else float(torch.rand((), generator=generator))
        before = round(at * space)
        pad = (filler * (space // len(filler) + 1))[:space]
        ids = pad[:before] + needle + pad[before:] + question + answer
        row_labels = [IGNORE_INDEX] * (length - len(answer)) + answer
        rows.append(ids)
        labels.append(row_labels)
        depths.append(before / space if space else 0.0)
    return torch.tensor(rows), torch.tensor(labels), torch.tensor(depths)


@torch.no_grad()
def answer_accuracy(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[N] bool: every labelled token of the row predicted exactly (argmax, teacher forcing)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = []
    for x, y in zip(input_ids.split(batch_size), labels.split(batch_size)):
        x, y = x.to(device), y.to(device)
        predicted = model(input_ids=x, use_cache=False).logits[:, :-1].argmax(-1)
        target = y[:, 1:]
        scored = target != IGNORE_INDEX
        correct.append(((predicted == target) | ~scored).all(1).cpu())
    model.train(was_training)
    return torch.cat(correct)


# ----------------------------------------------------------------------------- MQAR beyond a segment

def far_mqar_batch(seq_len: int, num_kv_pairs: int, min_query_position: int, vocab_size: int, batch_size: int,
                   generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """MQAR whose queries all sit at positions >= ``min_query_position``.

    The first 2P tokens are k1 v1 ... kP vP (keys from [1, V/2), values from [V/2, V), distinct);
    each key is queried once, at distinct even offsets drawn uniformly from
    [max(2P, min_query_position), T); every other position holds a random token. Returns
    (inputs, targets) [B, T]: the target at a query is its value, IGNORE_INDEX elsewhere (as
    ``quality.mqar_batch``; ``quality.hf_labels`` gives the HF labels)."""
    T, P, V = seq_len, num_kv_pairs, vocab_size
    start = max(2 * P, min_query_position)
    start += start % 2
    space = (T - start) // 2
    if space < P or V // 2 - 1 < P or V <= 2:
        raise ValueError(f"far MQAR: {T} tokens from position {start} cannot hold {P} queries, or the vocabulary "
                         f"({V}) cannot give {P} distinct keys")
    device = generator.device
    key_vocab = V // 2
    keys = torch.rand(batch_size, key_vocab - 1, generator=generator, device=device).topk(P, dim=1).indices + 1
    values = torch.rand(batch_size, V - key_vocab, generator=generator, device=device).topk(P, dim=1).indices + key_vocab
    inputs = torch.randint(V, (batch_size, T), generator=generator, device=device)
    inputs[:, 0:2 * P:2] = keys
    inputs[:, 1:2 * P:2] = values
    slots = torch.rand(batch_size, space, generator=generator, device=device).topk(P, dim=1).indices
    queries = start + 2 * slots
    inputs.scatter_(1, queries, keys)
    targets = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, queries, values)
    return inputs, targets


# ----------------------------------------------------------------------------- plots

def plot_loss_by_position(results: Dict[str, List[Dict[str, float]]], path, title: str) -> None:
    """One line per model: bits per byte against the bucket's end position (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, buckets in results.items():
        ax.plot([b["end"] for b in buckets], [b["bits_per_byte"] for b in buckets], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (end of bucket, tokens)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(accuracy: Dict[Tuple[int, float], float], path, title: str) -> None:
    """A heat map of passkey accuracy: context length (columns) by depth (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({length for length, _ in accuracy})
    depths = sorted({depth for _, depth in accuracy})
    grid = [[accuracy.get((length, depth), math.nan) for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{length // 1024}k" if length >= 1024 else str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:.2f}" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
