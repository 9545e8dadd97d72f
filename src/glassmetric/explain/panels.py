"""The figures and text lines of one explained pair, as ``glassmetric explain``, the HTML report
and the web explorer show them.

``"flows"``: the structural figure (:func:`glassmetric.explain.figures.structural_pair_figure`)
with each image's uncertainty and the pair's two IDML distances when the model has an
uncertainty head; ``"groups"``: the per-group attention panels
(:func:`glassmetric.explain.figures.group_pair_figure`) of a grouping model. Both draw the original
photos at their own resolution when the pair carries them (``pair.originals``), else the
images as the model saw them.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from glassmetric.explain.figures import format_scores, group_pair_figure, structural_pair_figure
from glassmetric.explain.pair import PairExplanation

__all__ = ["group_summary", "pair_figures", "pair_summary"]


def pair_figures(
    pair: PairExplanation, titles: tuple[str, str] = ("query", "candidate"), *, top_flows: int = 64
) -> dict[str, Figure]:
    """``{"flows": ..., "groups": ...}``: the figures the pair's explanations allow, in that order.

    ``top_flows``: the most cell pairs drawn (the fewest strongest that carry half of SS).
    """
    figures: dict[str, Figure] = {}
    image_x, image_y = pair.originals or pair.images
    e, intro = pair.structural, pair.introspective
    if e is not None:
        # each image's uncertainty over it, the pair's two distances in the title
        notes: tuple[str, str] | None = None
        if intro is not None:
            ux, uy = intro.uncertainty
            notes = (f"uncertainty {ux:.3g}", f"uncertainty {uy:.3g}")
        fig = structural_pair_figure(image_x, image_y, e, top_flows=top_flows, titles=titles, notes=notes)
        if intro is not None:
            fig.suptitle(
                f"{format_scores(e)}\nsemantic distance {intro.semantic_distance:.3f}, "
                f"introspective {intro.introspective_distance:.3f}",
                fontsize=15,
                fontweight="bold",
            )
        figures["flows"] = fig
    if pair.groups is not None:
        figures["groups"] = group_pair_figure(image_x, image_y, pair.groups, titles=titles)
    return figures


def group_summary(pair: PairExplanation) -> str:
    """``"score 0.612 = (0.7 + 0.5 + 0.6) / 3  (per-group cosines)"``."""
    g = pair.groups
    if g is None:
        raise ValueError("the pair has no group explanation (the model has no grouping head)")
    parts = " + ".join(f"{float(s):.3f}" for s in g.group_similarity)
    return f"score {float(g.score):.3f} = ({parts}) / {g.groups}  (per-group cosines)"


def pair_summary(pair: PairExplanation) -> list[str]:
    """One line per explanation: the structural score, the IDML scores, the per-group sum."""
    lines = []
    e = pair.structural
    if e is not None:
        lines.append(f"global {float(e.s_global):.3f} + structural {float(e.ss):.3f} = score {float(e.score):.3f}")
    if pair.introspective is not None:
        lines.append(pair.introspective.describe())
    if pair.groups is not None:
        lines.append(group_summary(pair))
    return lines
