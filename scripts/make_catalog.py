"""Regenerate service/backbones/catalog.json: the curated backbones with measured params and GMACs.

    python scripts/make_catalog.py            # writes the file (1-2 min of CPU)
    python scripts/make_catalog.py --check    # exit 1 if the committed file differs

What is typed here by hand: the names, families, weight tags and ImageNet-1k top-1 figures,
each with its source. What is measured: parameter count (the model built with
``pretrained=False`` and its 1000-class ImageNet head) and GMACs of one forward pass at the
entry's input size, counted with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2;
convolutions, matmuls and attention, not element-wise ops). The catalog is plain JSON so that
``backbones validate`` and ``backbones catalog`` never import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "service" / "backbones" / "catalog.json"

TIMM_CSV = "timm results/results-imagenet.csv, row {row} (evaluated at {px} px)"
MEASURED = "params and GMACs measured by scripts/make_catalog.py (timm {timm}, torch {torch})"
PAPER = "the paper used torchvision's ImageNet-1k weights ({tv} top-1); these are timm's"

# name, source, family, weights tag, paper?, top-1, where the top-1 comes from, note.
# Weight tags: ImageNet-1k-only weights throughout (as the paper), so a comparison is not
# confounded by ImageNet-21k/12k pretraining that only some backbones have.
ENTRIES: list[dict] = [
    # ---- the paper's backbones (Jeevan & Sethi, arXiv 2406.05612) ----
    dict(
        name="resnet50",
        family="CNN",
        weights="a1_in1k",
        paper=True,
        top1=81.214,
        top1_src=TIMM_CSV.format(row="resnet50.a1_in1k", px=288),
        note="the paper's code loads torchvision's IMAGENET1K_V2 weights (80.86 top-1; its README "
        "quotes V1's 76.13); these are timm's",
    ),
    dict(
        name="convnext_tiny",
        family="CNN",
        weights="fb_in1k",
        paper=True,
        top1=82.698,
        top1_src=TIMM_CSV.format(row="convnext_tiny.fb_in1k", px=288),
        note=PAPER.format(tv=82.52) + " (timm's default tag in12k_ft_in1k saw ImageNet-12k)",
    ),
    dict(
        name="swin_tiny_patch4_window7_224",
        family="attention",
        weights="ms_in1k",
        paper=True,
        top1=81.376,
        top1_src=TIMM_CSV.format(row="swin_tiny_patch4_window7_224.ms_in1k", px=224),
        note=PAPER.format(tv=81.47),
    ),
    dict(
        # torchvision's swin_v2_t: window 8 at 256 px, the same architecture as this entry.
        name="swinv2_tiny_window8_256",
        family="attention",
        weights="ms_in1k",
        paper=True,
        top1=81.820,
        top1_src=TIMM_CSV.format(row="swinv2_tiny_window8_256.ms_in1k", px=256),
        note=PAPER.format(tv=82.07) + "; torchvision's swin_v2_t is this window-8, 256 px model",
    ),
    dict(
        # tf_efficientnetv2_s is the architecture of the EfficientNetV2 paper, which torchvision's
        # efficientnet_v2_s implements (both 21.46 M params); efficientnetv2_rw_s is timm's own
        # variant with other widths (23.9 M).
        name="tf_efficientnetv2_s",
        family="CNN",
        weights="in1k",
        paper=True,
        top1=83.900,
        top1_src=TIMM_CSV.format(row="tf_efficientnetv2_s.in1k", px=384),
        note=PAPER.format(tv=84.23)
        + "; the paper's architecture (efficientnetv2_rw_s is timm's variant, 23.9 M params); "
        "timm's default tag in21k_ft_in1k saw ImageNet-21k",
    ),
    dict(
        name="densenet161",
        family="CNN",
        weights="tv_in1k",
        paper=True,
        top1=77.358,
        top1_src=TIMM_CSV.format(row="densenet161.tv_in1k", px=224),
        note="torchvision's own ImageNet-1k weights, as the paper (paper lists 77.14)",
    ),
    dict(
        name="mobilenetv3_large_100",
        family="CNN",
        weights="ra_in1k",
        paper=True,
        top1=75.766,
        top1_src=TIMM_CSV.format(row="mobilenetv3_large_100.ra_in1k", px=224),
        note=PAPER.format(tv=75.27),
    ),
    dict(
        name="regnety_032",
        family="CNN",
        weights="ra_in1k",
        paper=True,
        top1=82.728,
        top1_src=TIMM_CSV.format(row="regnety_032.ra_in1k", px=288),
        note=PAPER.format(tv=81.98) + " (torchvision's are timm's tag tv2_in1k, 81.756)",
    ),
    dict(
        name="resnext50_32x4d",
        family="CNN",
        weights="a1h_in1k",
        paper=True,
        top1=82.014,
        top1_src=TIMM_CSV.format(row="resnext50_32x4d.a1h_in1k", px=288),
        note=PAPER.format(tv=81.20),
    ),
    dict(
        name="shufflenet_v2_x2_0",
        source="torchvision",
        family="CNN",
        weights="IMAGENET1K_V1",
        paper=True,
        top1=76.230,
        top1_src="torchvision ShuffleNet_V2_X2_0_Weights.IMAGENET1K_V1 meta (acc@1 76.230)",
        note="timm has no ShuffleNetV2: built with torchvision.models.shufflenet_v2_x2_0, the "
        "paper's exact weights",
    ),
    dict(
        name="wavemix",
        source="wavemix",
        family="CNN",
        weights="cloudwalker/wavemix:Saved_Models_Weights/ImageNet/wavemix_192_16_75.06.pth",
        paper=True,
        top1=75.06,
        top1_src="the checkpoint's name on the hub (wavemix_192_16_75.06.pth); the paper's code "
        "README lists 75.32",
        note="the authors' 'wavemix' package (optional extra: pip install 'backbones[wavemix]'), "
        "the paper's configuration (depth 16, final_dim 192, level 3, patch 4); its ImageNet "
        "checkpoint is a .pth on the hub: `backbones weights push` converts it to safetensors",
    ),
    # ---- modern small backbones users ask for ----
    dict(
        name="efficientnet_b0",
        family="CNN",
        weights="ra_in1k",
        top1=77.694,
        top1_src=TIMM_CSV.format(row="efficientnet_b0.ra_in1k", px=224),
    ),
    dict(
        name="convnext_nano",
        family="CNN",
        weights="d1h_in1k",
        top1=81.482,
        top1_src=TIMM_CSV.format(row="convnext_nano.d1h_in1k", px=288),
    ),
    dict(
        name="vit_small_patch16_224",
        family="attention",
        weights="augreg_in1k",
        top1=78.846,
        top1_src=TIMM_CSV.format(row="vit_small_patch16_224.augreg_in1k", px=224),
        note="timm's default tag augreg_in21k_ft_in1k (81.384) saw ImageNet-21k",
    ),
    dict(
        name="deit_small_patch16_224",
        family="attention",
        weights="fb_in1k",
        top1=79.844,
        top1_src=TIMM_CSV.format(row="deit_small_patch16_224.fb_in1k", px=224),
    ),
    dict(
        name="mobilevitv2_100",
        family="hybrid",
        weights="cvnets_in1k",
        top1=78.076,
        top1_src=TIMM_CSV.format(row="mobilevitv2_100.cvnets_in1k", px=256),
    ),
    dict(
        name="levit_256",
        family="hybrid",
        weights="fb_dist_in1k",
        top1=81.514,
        top1_src=TIMM_CSV.format(row="levit_256.fb_dist_in1k", px=224),
        note="distilled from a RegNetY-16GF teacher",
    ),
    dict(
        name="fastvit_t8",
        family="hybrid",
        weights="apple_in1k",
        top1=76.2,
        top1_src="FastViT paper (arXiv 2303.14189), FastViT-T8 at 256 px; not in the timm "
        "results CSV consulted",
    ),
    # ---- tiny timm test models: CPU tests and the quickstart ----
    *[
        dict(
            name=f"test_{arch}",
            family=fam,
            weights="r160_in1k",
            top1=None,
            top1_src="no published ImageNet-1k top-1 (timm test model)",
            note="tiny model for tests and the CPU quickstart",
        )
        for arch, fam in (
            ("resnet", "CNN"),
            ("convnext", "CNN"),
            ("efficientnet", "CNN"),
            ("vit", "attention"),
        )
    ],
]


def _build(entry: dict):
    if entry.get("source") == "wavemix":
        from service.backbones import wavemix

        return wavemix.create(1000)
    if entry.get("source") == "torchvision":
        import torchvision

        return getattr(torchvision.models, entry["name"])(weights=None)
    import timm

    return timm.create_model(entry["name"], pretrained=False)


def _input_size(entry: dict, model) -> int:
    if entry.get("source") in ("torchvision", "wavemix"):
        return 224
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{entry['name']}.{entry['weights']}")
    return int(cfg.input_size[-1])


def measure(entry: dict) -> tuple[float, float, int]:
    """(params in M, GMACs at the input size, input size) of one entry."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = _build(entry).eval()
    size = _input_size(entry, model)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    return params / 1e6, counter.get_total_flops() / 2 / 1e9, size


def build_catalog() -> dict:
    import timm
    import torch

    measured = MEASURED.format(timm=timm.__version__, torch=torch.__version__.split("+")[0])
    rows = []
    for e in ENTRIES:
        available = e.get("available", True)
        if available:
            params_m, gmacs, size = measure(e)
            source = f"{measured}; top-1: {e['top1_src']}"
        else:
            params_m, gmacs, size = e.get("params_m"), None, 224
            source = e["top1_src"]
        rows.append(
            {
                "name": e["name"],
                "source": e.get("source", "timm"),
                "family": e["family"],
                "params_m": None if params_m is None else round(params_m, 2),
                "gmacs": None if gmacs is None else round(gmacs, 3),
                "input_size": size,
                "imagenet_top1": e["top1"],
                "weights": e["weights"],
                "paper": e.get("paper", False),
                "available": available,
                "note": e.get("note", ""),
                "figures_source": source,
            }
        )
        print(
            f"{e['name']:32s} {rows[-1]['params_m']} M  {rows[-1]['gmacs']} GMACs", file=sys.stderr
        )
    return {
        "format": "backbones-catalog/v1",
        "generated_by": "scripts/make_catalog.py",
        "entries": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text = json.dumps(build_catalog(), indent=2) + "\n"
    if args.check:
        same = OUT.read_text() == text
        print("catalog.json is up to date" if same else "catalog.json is stale")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
