import numpy as np

from cidm.plots import ia_heatmap, ia_lines, ia_matrix


def test_ia_matrix_marks_concepts_not_yet_learned():
    scores = {1: {"a": 80.0}, 2: {"a": 78.0, "b": 70.0}}
    m = ia_matrix(scores, ["a", "b"])
    assert m[0].tolist() == [80.0, 78.0]
    assert np.isnan(m[1, 0]) and m[1, 1] == 70.0


def test_plots_draw_one_cell_per_score_and_one_line_per_curve():
    fig = ia_heatmap({1: {"a": 80.0}, 2: {"a": 78.0, "b": 70.0}}, ["a", "b"])
    assert len(fig.axes[0].texts) == 3
    fig = ia_lines({"cidm": [80, 79], "finetune": [80, 60]})
    assert len(fig.axes[0].lines) == 2
