"""Regenerate the explanation figures in docs/ (the explorer and report screenshots come from
docs/screenshots.py).

    python docs/figures.py                                   # the embedded-data figures
    python docs/figures.py --cub-root ../shared/data/cub50   # and the real-bird figures

Embedded-data figures, from checkpoints under ``--runs`` (each trained there with the overrides
below when it is missing: the demo preset as ``make demo`` trains it, and two short runs of the
``demo_scratch`` preset on 16 images per class; ``--demo``, ``--introspective`` and ``--groups`` take your own checkpoints
instead):

    explain_pair.png           the demo preset: why two test images of class 60 were judged alike
    explain_introspective.png  demo_scratch + introspective similarity (3 epochs): the same pair
    uncertainty_grid.png       that checkpoint's 12 most and 12 least uncertain test images
    groups_pair.png            demo_scratch + 3 attention groups at 128 px (2 epochs): the same pair

The pair is drawn from files rendered at 192 px (``SyntheticParts("test", image_size=192)``,
images 0 and 3), so the figures show the photos at their own resolution and the model's
grid (128 px for the demo and the groups, 64 px for the introspective run) mapped onto them.

Real-bird figures (``--cub-root``: CUB-200-2011 classes 1-50 in the official layout):

    birds_pair.png         two Northern Flickers, by ``--birds-structural CKPT`` or, without it,
                           the untrained ``cub50`` preset (ImageNet features, training-free)
    birds_part_mass.png    each part's share of SS, ``--birds-structural CKPT`` against the
                           untrained preset, over ``--pairs`` same-class test pairs
    birds_groups.png       ``--birds-groups CKPT`` (a cub50 run with model.groups): 12 test birds
    birds_uncertainty.png  ``--birds-introspective CKPT``: the 12 most and least uncertain test birds

A figure whose checkpoint is not given is left as it is, and the script says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT / "src"))

from glassmetric.cli import main as cli  # noqa: E402
from glassmetric.config import load_config  # noqa: E402
from glassmetric.data.synthetic import SyntheticParts  # noqa: E402
from glassmetric.explain.correspondence import evaluate_correspondence  # noqa: E402
from glassmetric.explain.figures import part_mass_figure, save_figure  # noqa: E402
from glassmetric.explain.panels import pair_figures  # noqa: E402
from glassmetric.retriever import Retriever  # noqa: E402
from glassmetric.similarity.ot_settings import OTSettings  # noqa: E402
from glassmetric.training.fit import fit  # noqa: E402

#: the runs behind the embedded-data figures: name -> (preset, overrides); the demo is `make demo`'s,
#: the two short runs (16 images per class) use the small ResNet-18 preset so that they end in minutes
RUNS = {
    "demo": ("demo", []),
    "introspective": (
        "demo_scratch",
        [
            "model.uncertainty_dim=64",
            "loss.similarity=introspective",
            "data.synthetic.images_per_class=16",
            "trainer.max_epochs=3",
        ],
    ),
    "groups": (
        "demo_scratch",
        [
            "model.embedding_dim=96",
            "model.groups=3",
            "data.image_size=128",
            "data.resize=128",
            "data.synthetic.images_per_class=16",
            "trainer.max_epochs=2",
        ],
    ),
}
PAIR = (0, 3)  # test images of class 60
BIRDS = ("Northern_Flicker_0004_28854.jpg", "Northern_Flicker_0006_28290.jpg")


def checkpoint(name: str, given: Path | None, runs: Path, epochs: int | None) -> Path:
    """``given``, or the run ``runs/name`` of ``RUNS[name]`` (preset and overrides), trained if missing."""
    if given is not None:
        return given
    ckpt = runs / name / "checkpoints" / "best.ckpt"
    if not ckpt.exists():
        preset, overrides = RUNS[name]
        overrides = [*overrides, f"trainer.output_dir={runs / name}"]
        overrides += [f"trainer.max_epochs={epochs}"] if epochs else []
        print(f"training {ckpt} (glassmetric fit --config {preset} {' '.join(overrides)})", flush=True)
        fit(load_config(preset, overrides), overwrite=True, run_test=False)
    return ckpt


def pair_figure(retriever: Retriever, files: tuple[Path, Path], out: Path, kind: str = "flows") -> None:
    pair = retriever.explain(*files)
    save_figure(pair_figures(pair, (files[0].name, files[1].name))[kind], out)
    print(f"wrote {out}", flush=True)


def embedded_figures(args: argparse.Namespace, out: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="glassmetric-docs-"))
    data = SyntheticParts("test", image_size=192)
    files = []
    for name, i in zip(("bird_0.png", "bird_3.png"), PAIR, strict=True):
        data.load(i).image.save(folder / name)
        files.append(folder / name)
    pair = (files[0], files[1])

    demo = checkpoint("demo", args.demo, args.runs, args.epochs)
    pair_figure(Retriever.from_checkpoint(demo, "cpu"), pair, out / "explain_pair.png")
    intro = checkpoint("introspective", args.introspective, args.runs, args.epochs)
    pair_figure(Retriever.from_checkpoint(intro, "cpu"), pair, out / "explain_introspective.png")
    cli(["eval", "--checkpoint", str(intro), "--uncertainty-figure", str(out / "uncertainty_grid.png")])
    groups = checkpoint("groups", args.groups, args.runs, args.epochs)
    pair_figure(Retriever.from_checkpoint(groups, "cpu"), pair, out / "groups_pair.png", kind="groups")


def part_mass(retriever: Retriever, pairs: int) -> tuple[dict[str, float], int]:
    """Each part's mean share of SS over ``pairs`` same-class test pairs, and the number of cells."""
    cfg, model = retriever.cfg, retriever.model
    ot = OTSettings.from_config(cfg)
    corr = evaluate_correspondence(
        model,
        retriever.eval_data(split="test")[1],
        pairs=pairs,
        grid=cfg.model.spatial_grid or 4,
        crop=cfg.data.eval_image_size or cfg.data.image_size,
        resize=cfg.data.resize,
        settings=ot,
        mean=model.backbone.mean,
        std=model.backbone.std,
    )
    return corr["part_mass"], corr["n_cells"]


def bird_figures(args: argparse.Namespace, out: Path) -> None:
    root = args.cub_root.resolve()
    data = [f"data.root={root}"]
    files = tuple(next((root / "images").glob(f"*/{name}")) for name in BIRDS)
    preset = Retriever.from_preset("cub50", data, device="cpu")
    if args.birds_structural is None:
        pair_figure(preset, (files[0], files[1]), out / "birds_pair.png")
        print("birds_part_mass.png left as it is: give --birds-structural CKPT (compared with the untrained preset)")
    else:
        trained = Retriever.from_checkpoint(args.birds_structural, "cpu", data)
        pair_figure(trained, (files[0], files[1]), out / "birds_pair.png")
        models = {"untrained cub50 preset, training-free": preset, "structurally trained checkpoint": trained}
        masses, n_cells = {}, 16
        for label, retriever in models.items():
            masses[label], n_cells = part_mass(retriever, args.pairs)
        title = f"Which bird parts carry the structural similarity ({args.pairs} CUB-50 test pairs, same class)"
        save_figure(part_mass_figure(masses, n_cells, title=title), out / "birds_part_mass.png")
        print(f"wrote {out / 'birds_part_mass.png'}", flush=True)

    if args.birds_groups:
        groups_figure = str(out / "birds_groups.png")
        cli(
            [
                "eval",
                "--checkpoint",
                str(args.birds_groups),
                "--groups-parts",
                "1000",
                "--groups-figure",
                groups_figure,
                *data,
            ]
        )
    else:
        print("birds_groups.png left as it is: give --birds-groups CKPT (a cub50 run with model.groups)")
    if args.birds_introspective:
        u = str(out / "birds_uncertainty.png")
        cli(["eval", "--checkpoint", str(args.birds_introspective), "--uncertainty-figure", u, *data])
    else:
        print(
            "birds_uncertainty.png left as it is: give --birds-introspective CKPT (a cub50 run with an uncertainty head)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "docs", help="where missing checkpoints are trained"
    )
    parser.add_argument("--epochs", type=int, help="train missing checkpoints for this many epochs (quick looks)")
    parser.add_argument(
        "--demo", type=Path, help="the demo checkpoint (e.g. make demo's runs/demo/checkpoints/best.ckpt)"
    )
    parser.add_argument("--introspective", type=Path, help="a demo checkpoint with an uncertainty head")
    parser.add_argument("--groups", type=Path, help="a demo checkpoint with attention groups")
    parser.add_argument("--cub-root", type=Path, help="CUB-200-2011 (classes 1-50 suffice): also the birds_* figures")
    parser.add_argument("--birds-structural", type=Path, help="a cub50 checkpoint for birds_pair / birds_part_mass")
    parser.add_argument("--birds-groups", type=Path, help="a cub50 checkpoint with model.groups")
    parser.add_argument("--birds-introspective", type=Path, help="a cub50 checkpoint with model.uncertainty_dim")
    parser.add_argument("--pairs", type=int, default=300, help="same-class test pairs behind birds_part_mass")
    parser.add_argument("--only", choices=("embedded", "birds"), help="one of the two families")
    parser.add_argument("-o", "--output", type=Path, default=DOCS, help="folder the figures are written to")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.only != "birds":
        embedded_figures(args, args.output)
    if args.only != "embedded":
        if args.cub_root is None:
            print("the birds_* figures are left as they are: give --cub-root")
        else:
            bird_figures(args, args.output)


if __name__ == "__main__":
    main()
