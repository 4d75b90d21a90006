"""What a CLIP's image embeddings carry of the demo scenes: a linear probe per caption attribute.

    python -m benchmarks.clip_probe --train datasets/demo/emb_train --heldout datasets/demo/emb_heldout

The decoder reads little more than a linear projection of the image embedding, so an attribute that a
linear classifier cannot read from the embedding (trained on the train split's embeddings, scored on the
held-out split's) is one the decoder cannot draw from it either. On the `varied` preset the demo CLIP's
embeddings carried the color but hardly the shape (README, "make demo"); this is the command that showed it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from data.embeddings import EmbeddingStore
from data.following import parse_caption

ATTRIBUTES = ("shape", "color", "background", "size")


def embeddings_and_captions(root: str) -> tuple[torch.Tensor, list[str]]:
    store = EmbeddingStore(root)
    parts = [store.load_part(part) for part in store.parts]
    captions = [c for p in parts for c in p["caption"]]
    if any(c is None for c in captions):
        raise ValueError(f"{root}: the probe needs captions in the metadata (data.embed writes them)")
    return torch.from_numpy(np.concatenate([p["img_emb"] for p in parts])), captions


def _attribute(captions: list[str], attribute: str) -> list[str]:
    parsed = [parse_caption(c) for c in captions]
    if None in parsed:
        bad = captions[parsed.index(None)]
        raise ValueError(f"the probe reads one-object synthetic captions (the demo presets'), not {bad!r}")
    return [p[attribute] for p in parsed]


def probe(
    train: tuple[torch.Tensor, list[str]],
    heldout: tuple[torch.Tensor, list[str]],
    attribute: str,
    steps: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out accuracy of a softmax-regression probe for one attribute, next to chance (the most
    frequent held-out value's share)."""
    (x, captions), (xh, captions_h) = train, heldout
    labels, labels_h = _attribute(captions, attribute), _attribute(captions_h, attribute)
    names = sorted(set(labels) | set(labels_h))
    y = torch.tensor([names.index(v) for v in labels])
    yh = torch.tensor([names.index(v) for v in labels_h])
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], len(names))
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):  # full-batch: the demo's 20k embeddings fit at once
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(x), y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((linear(xh).argmax(1) == yh).float().mean())
    chance = float(torch.bincount(yh).max()) / len(yh)
    return {"accuracy": accuracy, "chance": chance, "classes": len(names)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="embedding folder of the train split (data.embed --out)")
    p.add_argument("--heldout", required=True, help="embedding folder of the held-out split")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    train, heldout = embeddings_and_captions(args.train), embeddings_and_captions(args.heldout)
    print(f"linear probe of {args.train} ({len(train[1])}) on {args.heldout} ({len(heldout[1])})")
    print("| attribute | held-out accuracy | chance |\n|---|---:|---:|")
    for attribute in ATTRIBUTES:
        r = probe(train, heldout, attribute, args.steps)
        print(f"| {attribute} | {r['accuracy']:.1%} | {r['chance']:.1%} |")


if __name__ == "__main__":
    main()
