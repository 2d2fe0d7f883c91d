"""The ensemble's Ray-free core: fusion, automatic groups, the one-pass grid (exactly a
brute-force grid), the weighted pixel sample, greedy selection and a bare Optuna loop, on
synthetic scores whose best weights are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vspw_ray.data import label_lut, list_frames, read_raw_mask, read_split, reduce_mask
from vspw_ray.ensemble.core.fusion import (
    MemberInfo,
    auto_groups,
    fuse,
    fused_labels,
    group_means,
    group_order,
)
from vspw_ray.ensemble.core.greedy import greedy_select
from vspw_ray.ensemble.core.grid import (
    GridConfusions,
    grid_axis,
    grid_confusions,
    grid_search_store,
    make_grid,
    shard_videos,
)
from vspw_ray.ensemble.core.sample import (
    concat_samples,
    frame_rng,
    sample_frame,
    sample_miou,
    sample_store,
    weighted_confusion,
)
from vspw_ray.metrics import confusion, mean_iou

A_STAR, B_STAR = 0.6, 1.4  # the designed optimum: inside 0..2, off the corners
SLOPE = 0.4
AXIS = grid_axis(0.0, 2.0, 0.1)
GRID = make_grid([AXIS, AXIS])


def designed_scores(rng, frames: int, h: int, w: int, c: int = 6, hard: float = 0.2):
    """Group scores ``[F, 3, C, H, W]`` (base, weak, aux) and reduced ground truth
    ``[F, H, W]`` whose fused mIoU is 100 % exactly for alpha in (0.55, 0.65) and beta in
    (1.35, 1.45), and falls off step by step away from there.

    Each pixel has its true class and a rival; the fused margin true - rival is
    ``m0 + alpha m1 + beta m2``. "Easy" pixels (1 - ``hard``) win at every weight; each hard
    pixel type flips at one threshold ``t`` of one weight: correct iff alpha > t (thresholds
    0.55, 0.45, ...) or alpha < t (0.65, 0.75, ...), likewise for beta around 1.4.
    """
    types = [(0.3, 0.3, 0.3)]
    for axis, best in ((1, A_STAR), (2, B_STAR)):
        for t in np.round(np.arange(best - 0.05, 0, -0.1), 2):
            m = [-SLOPE * t, 0.0, 0.0]
            m[axis] = SLOPE
            types.append(m)
        for t in np.round(np.arange(best + 0.05, 2, 0.1), 2):
            m = [SLOPE * t, 0.0, 0.0]
            m[axis] = -SLOPE
            types.append(m)
    types = np.array(types)
    n = frames * h * w
    kind = rng.choice(len(types), size=n, p=np.r_[1 - hard, np.full(len(types) - 1, hard / (len(types) - 1))])
    true = rng.integers(0, c, n)
    rival = (true + rng.integers(1, c, n)) % c
    margins = types[kind].T
    scores = np.full((3, c, n), 0.1 / (c - 2), np.float32)  # the other classes never win
    cols = np.arange(n)
    for k in range(3):
        scores[k, true, cols] = 0.45 + margins[k] / 2
        scores[k, rival, cols] = 0.45 - margins[k] / 2
    gt = true.astype(np.uint8)
    gt[rng.random(n) < 0.05] = 255
    scores = scores.reshape(3, c, frames, h, w).transpose(2, 0, 1, 3, 4)
    return np.ascontiguousarray(scores), gt.reshape(frames, h, w)


def brute_force_grid(frames, points, c):
    """Every point fused and scored on its own, in plain numpy."""
    out = np.zeros((len(points), c, c), np.int64)
    for p, w in enumerate(points):
        for s, gt in frames:
            fused = s[0]
            for j, wj in enumerate(w, 1):
                fused = fused + np.float32(wj) * s[j]
            out[p] += confusion(fused.argmax(0), gt, c)
    return out


def point_index(w) -> int:
    return int(np.flatnonzero(np.isclose(GRID, w).all(1))[0])


@pytest.fixture(scope="module")
def designed():
    return designed_scores(np.random.default_rng(0), 8, 60, 80)


@pytest.fixture(scope="module")
def designed_large():
    """~0.9 M pixels: enough that a few-percent sample has a small sampling error."""
    return designed_scores(np.random.default_rng(1), 32, 120, 240)


# ---------------------------------------------------------------------------------- fusion
def test_group_means_fuse_and_labels():
    g = torch.Generator().manual_seed(0)
    probs = {m: torch.rand(4, 5, 6, generator=g).softmax(0) for m in "abcd"}
    groups = {"strong": ["a", "b"], "weak": ["c"], "aux": ["d"]}
    means = group_means(probs, groups, "prob")
    assert torch.allclose(means["strong"], (probs["a"] + probs["b"]) / 2)
    logs = group_means(probs, groups, "log")
    assert torch.allclose(logs["strong"].exp(), (probs["a"] * probs["b"]).sqrt(), atol=1e-6)
    fused = fuse(means, {"weak": 1.4, "aux": 0.5}, "strong")
    assert torch.allclose(fused, means["strong"] + 1.4 * means["weak"] + 0.5 * means["aux"])
    labels = fused_labels(means, {"weak": 1.4, "aux": 0.5, "strong": 1.0}, "strong")
    assert labels.dtype == np.uint8 and (labels == fused.argmax(0).numpy()).all()
    assert group_order(groups, "weak") == ["weak", "strong", "aux"]
    with pytest.raises(ValueError, match="fixed at 1"):
        fuse(means, {"strong": 2.0, "weak": 1.0, "aux": 1.0}, "strong")
    with pytest.raises(ValueError, match="missing"):
        fuse(means, {"weak": 1.0}, "strong")
    with pytest.raises(ValueError, match="prob"):
        group_means(probs, groups, "linear")


def test_auto_groups_follow_the_seed_rule():
    members = [MemberInfo("mf1", "maskformer", 0.50), MemberInfo("mf2", "maskformer", 0.55),
               MemberInfo("mf3", "maskformer", 0.45), MemberInfo("mf4", "maskformer", 0.48),
               MemberInfo("up1", "upernet", 0.52), MemberInfo("up2", "upernet", 0.40),
               MemberInfo("up3", "upernet", 0.47)]
    assert auto_groups(members, strong=2, auxiliary=2) == {
        "strong": ["mf2", "mf1"], "weak": ["mf4", "mf3"], "aux": ["up1", "up3"]}
    # the best member's family is the base even when the other family is larger
    assert auto_groups(members[4:] + members[:1], strong=3, auxiliary=0) == {
        "strong": ["up1", "up3", "up2"]}
    groups = auto_groups(members[4:] + members[:1], strong=3, auxiliary=1)
    assert groups == {"strong": ["up1", "up3", "up2"], "aux": ["mf1"]}  # empty "weak" dropped
    with pytest.raises(ValueError, match="two model families"):
        auto_groups(members + [MemberInfo("x", "segformer", 0.1)], 1, 1)
    with pytest.raises(ValueError, match="strong"):
        auto_groups(members, 0, 1)


# ---------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("k, space, axes, small_blocks", [
    (3, "prob", [AXIS, AXIS], False),
    (3, "prob", [AXIS, AXIS], True),
    (3, "log", [AXIS, AXIS], False),
    (2, "prob", [grid_axis(0.5, 1.5, 0.05)], False),
    (4, "prob", [grid_axis(0, 2, 0.5)] * 3, False),
])
def test_one_pass_grid_equals_brute_force_exactly(k, space, axes, small_blocks, monkeypatch):
    """Point by point, the same matrices as fusing and scoring every point separately; scores
    quantised to 1/8 so that exact ties (resolved to the lower class) occur often.
    ``small_blocks``: pixel chunks, point blocks and candidate buckets far smaller than the
    data, so that every boundary and the all-classes path are crossed."""
    import vspw_ray.ensemble.core.grid as grid

    if small_blocks:
        monkeypatch.setattr(grid, "CHUNK", 100)
        monkeypatch.setattr(grid, "BLOCK_VALUES", 1000)
        monkeypatch.setattr(grid, "BUCKETS", (2,))
    rng = np.random.default_rng(k)
    c, points = 5, make_grid(axes)
    frames = []
    for _ in range(3):
        p = rng.dirichlet(np.full(c, 0.7), size=(k, 24, 32)).transpose(0, 3, 1, 2)
        p = np.maximum(np.round(p * 8) / 8, 1e-3).astype(np.float32)
        s = np.log(p) if space == "log" else p
        gt = rng.integers(0, c, (24, 32)).astype(np.uint8)
        gt[rng.random((24, 32)) < 0.1] = 255
        frames.append((s.astype(np.float32), gt))
    acc = GridConfusions(points, c)
    for s, gt in frames:
        acc.add_frame(s, gt)
    np.testing.assert_array_equal(acc.total(), brute_force_grid(frames, points, c))
    assert acc.common.sum() > 0 and acc.contested.sum() > 0  # both paths were taken


@pytest.mark.parametrize("space", ["prob", "log"])
def test_plans_sharing_groups_get_the_labels_each_gets_alone(space, monkeypatch):
    """Rescoring labels several plans of one group structure together with the grid's corner
    pass (``point_labels``); each plan's labels equal fusing it alone (``fuse_arrays``) and
    taking the first maximum, on quantised scores where exact ties are common, with chunks and
    buckets small enough that the settled, bucketed and all-classes paths are all taken."""
    import vspw_ray.ensemble.core.grid as grid
    from vspw_ray.ensemble.core.rescore import FrameFusion, FusionPlan

    monkeypatch.setattr(grid, "CHUNK", 150)
    monkeypatch.setattr(grid, "BUCKETS", (2,))
    rng = np.random.default_rng(3)
    c, groups = 6, {"s": ["a", "b"], "w": ["c"], "x": ["d", "e"]}
    probs = {m: torch.from_numpy(np.maximum(np.round(rng.dirichlet(
        np.full(c, 0.7), size=(20, 30)).transpose(2, 0, 1) * 8) / 8, 1e-3).astype(np.float32))
        for ms in groups.values() for m in ms}
    points = [(0.0, 0.0), (1.0, 0.5), (0.5, 1.0), (2.0, 0.0), (1.5, 1.5), (0.3, 0.7)]
    plans = {f"p{i}": FusionPlan(groups, w, space, c) for i, w in enumerate(points)}
    together = FrameFusion(plans)
    assert together.shared  # the corner pass labels them, not one fusion each
    labels = together.labels(probs.items())
    for name, plan in plans.items():
        alone = FrameFusion({name: plan})
        assert not alone.shared
        np.testing.assert_array_equal(labels[name], alone.labels(probs.items())[name])
    member = {m: np.log(p.numpy()) if space == "log" else p.numpy() for m, p in probs.items()}
    s = [np.stack([member[m] for m in ms]).mean(0, dtype=np.float32) for ms in groups.values()]
    winners, reach = grid.candidates([x.reshape(c, -1) for x in s], np.array(points))
    counts = reach.sum(0)
    assert (counts == 1).any() and (counts == 2).any() and (counts > 2).any()  # every path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_class_outside_the_candidates_never_wins_anywhere_in_the_box(seed):
    """Against a brute force: the reach of each class over the lowest corner's winner is the
    float64 maximum over the box's corners (to the rounding tolerance), the argmax at every
    probed point of the box is a candidate, and a pixel with one candidate has the corner's
    winner at every point. Scores quantised to eighths, so ties occur."""
    import itertools

    import vspw_ray.ensemble.core.grid as grid
    from vspw_ray.ensemble.core.fusion import fuse_points

    rng = np.random.default_rng(seed)
    c, n, k = 7, 4000, 3
    s = [np.round(rng.dirichlet(np.full(c, 0.6), size=n).T * 8).astype(np.float32) / 8
         for _ in range(k)]
    lo = rng.uniform(0.0, 1.0, k - 1)
    span = rng.uniform(0.0, 1.5, k - 1)
    if seed == 2:
        span[0] = 0.0  # a weight fixed in the box
    hi = lo + span
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    inside = lo + rng.uniform(0, 1, (40, k - 1)) * (hi - lo)
    winner, tol, reach = grid._corner_pass(s, np.vstack([lo, hi]))
    cols = np.arange(n)
    fused = [s[0] + sum(np.float64(np.float32(w[j])) * s[j + 1] for j in range(k - 1))
             for w in corners]  # float64, at the float32 weights the fusion uses
    np.testing.assert_allclose(reach, np.max([f - f[winner, cols] for f in fused], axis=0),
                               atol=float(tol))
    mask = reach >= -tol
    single = mask.sum(0) == 1
    assert single.any() and (~single).any()
    labels = grid.argmax_rows(fuse_points(np.stack(s), np.vstack([corners, inside])))
    assert mask[labels, cols].all()  # every point's winner is a candidate
    assert (labels[:, single] == winner[single]).all()


def test_grid_finds_the_designed_optimum(designed):
    scores, gt = designed
    raw = np.where(gt == 255, 255, gt + 1).astype(np.uint8)  # raw VSPW ids
    matrices = grid_confusions(zip(scores, raw), GRID, 6)
    miou = np.array([mean_iou(m) for m in matrices])
    np.testing.assert_allclose(GRID[miou.argmax()], [A_STAR, B_STAR])
    assert miou.max() == 1.0
    # the construction: equal weights and (0, 0) are each at least a point worse
    assert miou.max() - miou[point_index((1, 1))] >= 0.01
    assert miou.max() - miou[point_index((0, 0))] >= 0.01
    assert (np.sort(miou)[-2] < 1.0)  # a unique best grid point


# ---------------------------------------------------------------------------------- sample
def test_weighted_sample_miou_is_close_to_the_full_miou(designed_large):
    scores, gt = designed_large
    box = [(0.0, 2.0), (0.0, 2.0)]
    sample = concat_samples([
        sample_frame(s, g, rate=0.2, min_per_class=16, box=box, rng=frame_rng(0, "v", str(i)))
        for i, (s, g) in enumerate(zip(scores, gt))])
    valid = int((gt != 255).sum())
    assert sample.size < 0.06 * valid  # contested pixels only: a few percent of all
    for w in [(0, 0), (1, 1), (A_STAR, B_STAR), (0.3, 1.8), (2.0, 0.5)]:
        full = mean_iou(sum(confusion((s[0] + np.float32(w[0]) * s[1] + np.float32(w[1]) * s[2])
                                      .argmax(0), g, 6) for s, g in zip(scores, gt)))
        assert abs(sample_miou(sample, w) - full) < 0.003, w
    with pytest.raises(ValueError, match="outside"):
        sample_miou(sample, [2.5, 1.0])


def test_plain_sample_weights_and_every_class_kept():
    """Without a box: each class of a frame keeps max(min_per_class, rate * n) pixels, weights
    n / m restore the class counts exactly, and the draw is reproducible."""
    rng = np.random.default_rng(3)
    gt = rng.choice([0, 1, 2, 255], size=(50, 60), p=[0.9, 0.07, 0.002, 0.028]).astype(np.uint8)
    scores = [rng.random((3, 50, 60), dtype=np.float32) for _ in range(2)]
    a = sample_frame(scores, gt, rate=0.03, min_per_class=10, rng=frame_rng(7, "v", "f"))
    b = sample_frame(scores, gt, rate=0.03, min_per_class=10, rng=frame_rng(7, "v", "f"))
    np.testing.assert_array_equal(a.labels, b.labels)
    counts = np.bincount(gt[gt != 255], minlength=3)
    np.testing.assert_allclose(np.bincount(a.labels, weights=a.weights, minlength=3), counts)
    kept = np.bincount(a.labels, minlength=3)
    assert kept[2] == min(counts[2], 10) and kept[0] == int(np.ceil(0.03 * counts[0]))
    cm = weighted_confusion(a.labels, a.scores[0].argmax(-1), a.weights, 3)
    assert cm.sum() == pytest.approx(counts.sum())


# ---------------------------------------------------------------------------------- searches
def test_greedy_and_optuna_recover_the_designed_optimum(designed):
    scores, gt = designed
    frames = list(zip(scores, gt))
    plain = concat_samples([sample_frame(s, g, rate=0.1, min_per_class=16,
                                         rng=frame_rng(0, "v", str(i)))
                            for i, (s, g) in enumerate(frames)])
    counts, history = greedy_select(plain.scores, plain.labels, plain.weights, rounds=19)
    assert counts[0] > 0 and len(history) == 20  # the start (the best member) and 19 rounds
    assert abs(counts[1] / counts[0] - A_STAR) <= 0.1 and abs(counts[2] / counts[0] - B_STAR) <= 0.1

    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sample = concat_samples([sample_frame(s, g, rate=0.2, min_per_class=16, box=[(0, 2), (0, 2)],
                                          rng=frame_rng(0, "v", str(i)))
                             for i, (s, g) in enumerate(frames)])
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: sample_miou(sample, [t.suggest_float("alpha", 0, 2),
                                                  t.suggest_float("beta", 0, 2)]), n_trials=100)
    best = study.best_params
    assert abs(best["alpha"] - A_STAR) <= 0.1 and abs(best["beta"] - B_STAR) <= 0.1


def _iou_by_hand(pred, labels, weights, c) -> float:
    cm = np.zeros((c, c))
    np.add.at(cm, (labels, pred), weights)
    return float(np.mean([cm[k, k] / (cm[k].sum() + cm[:, k].sum() - cm[k, k])
                          for k in range(c) if cm[k].sum() > 0]))


def reference_greedy(scores, labels, weights, rounds, init=1):
    """Caruana et al.'s loop written out: the ``init`` best members to start, then the mean of
    the chosen members with one more each round, IoU by hand, the earliest best state kept."""
    m, _, c = scores.shape
    singles = [_iou_by_hand(scores[j].argmax(-1), labels, weights, c) for j in range(m)]
    chosen = sorted(range(m), key=lambda j: (-singles[j], j))[:init]
    history = [_iou_by_hand(np.mean([scores[i] for i in chosen], axis=0).argmax(-1), labels,
                            weights, c)]
    for _ in range(rounds):
        best = None
        for j in range(m):
            pred = np.mean([scores[i] for i in chosen + [j]], axis=0).argmax(-1)
            score = _iou_by_hand(pred, labels, weights, c)
            if best is None or score > best[0]:
                best = (score, j)
        chosen.append(best[1])
        history.append(best[0])
    keep = init + history.index(max(history))
    return np.bincount(chosen[:keep], minlength=m), history


def _greedy_case(seed=5, m=5, n=300, c=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    scores = rng.dirichlet(np.ones(c), size=(m, n)).astype(np.float32)
    scores[:, np.arange(n), labels] += rng.random((m, 1)) * 0.3  # members of unequal skill
    return scores, labels, rng.uniform(0.5, 3.0, n)


@pytest.mark.parametrize("init", [1, 2, 3])
def test_greedy_equals_a_reference_implementation(init):
    scores, labels, weights = _greedy_case()
    counts, history = greedy_select(scores, labels, weights, rounds=8, init=init)
    ref_counts, ref_history = reference_greedy(scores, labels, weights, 8, init=init)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(history, ref_history, rtol=1e-12)
    assert counts.sum() >= init  # the start is never dropped


def test_bagged_greedy_equals_greedy_on_literally_resampled_videos():
    """One bag weighs each pixel by its video's multiplicity in a bootstrap draw; the reference
    copies each drawn video's pixels as often as it was drawn and runs the plain loop."""
    from vspw_ray.ensemble.core.greedy import bagged_greedy, video_resample

    scores, labels, weights = _greedy_case(seed=9, n=400)
    videos = np.repeat(np.arange(8) * 7919, 50)  # 8 videos of 50 pixels, arbitrary ids
    for bags in (1, 2, 3):
        mean, per_bag = bagged_greedy(scores, labels, weights, videos, 6, init=2, bags=bags,
                                      seed=4)
        assert len(per_bag) == bags and mean.sum() == pytest.approx(1.0)
        rng = np.random.default_rng(4)
        expected = []
        for b in range(bags):
            if bags == 1:
                take = np.arange(len(labels))
            else:
                mult = video_resample(videos, rng).astype(int)
                take = np.concatenate([np.repeat(i, k) for i, k in enumerate(mult) if k])
            counts, _ = reference_greedy(scores[:, take], labels[take], weights[take], 6, init=2)
            np.testing.assert_array_equal(per_bag[b], counts)
            expected.append(counts / counts.sum())
        np.testing.assert_allclose(mean, np.mean(expected, axis=0), rtol=1e-12)
    # a bootstrap draw keeps whole videos: every pixel of a video has one multiplicity
    mult = video_resample(videos, np.random.default_rng(0))
    assert all(len(set(mult[videos == v])) == 1 for v in np.unique(videos))
    assert mult.sum() == len(videos)


# ---------------------------------------------------------------------------------- hull
def test_hull_candidates_hold_every_winner_inside_the_hull():
    """Member scores quantised so that near-ties abound; at random points of the hull (group
    weights in the box, random shares inside groups, each single base member, the base mean)
    the fused argmax is always a candidate, and a pixel with one candidate has its winner."""
    from vspw_ray.ensemble.core.sample import Hull, hull_candidates

    rng = np.random.default_rng(0)
    m, c, n = 5, 6, 4000
    shared = rng.dirichlet(np.full(c, 0.3), size=n)  # members that mostly agree
    own = rng.dirichlet(np.full(c, 0.5), size=(m, n))
    s = np.maximum(np.round((0.8 * shared + 0.2 * own).transpose(0, 2, 1) * 8) / 8,
                   1e-3).astype(np.float32)
    hull = Hull(((0, 1), (2,), (3, 4)), 0.0, 2.0)
    winner, mask = hull_candidates(list(s), hull)
    assert (mask.sum(0) == 1).mean() > 0.2 and (mask.sum(0) > 1).any()  # both kinds occur
    points = [hull.member_weights([0.0, 0.0], [[1, 0], [1], [1, 1]]),
              hull.member_weights([0.0, 0.0], [[0, 1], [1], [1, 1]]),
              hull.member_weights([2.0, 2.0], [[1, 1], [1], [0, 1]])]
    points += [hull.member_weights(rng.uniform(0, 2, 2), [rng.random(2), [1], rng.random(2)])
               for _ in range(40)]
    settled = mask.sum(0) == 1
    for v in points:
        hull.check(v)
        fused = np.tensordot(v.astype(np.float32), s, axes=1)
        best = fused.argmax(0)
        assert mask[best, np.arange(n)].all()
        np.testing.assert_array_equal(best[settled], winner[settled])
    with pytest.raises(ValueError, match="outside"):
        hull.check(hull.member_weights([2.5, 0.0], [[1, 1], [1], [1, 1]]))


# ---------------------------------------------------------------------------------- choice
def test_choice_is_the_best_exact_candidate_ties_to_fewer_members():
    from vspw_ray.ensemble.core.candidates import (
        Candidate,
        choose,
        disagreement,
        fits_for,
        mean_candidate,
        single_candidates,
    )

    keys = ["a", "b", "c"]
    cands = [Candidate("grid#0@A", "searched", {"s": ["a", "b"], "w": ["c"]}, {"w": 0.5}),
             *single_candidates(keys, {}), mean_candidate(keys)]
    good, bad = np.diag([5, 5]).astype(np.int64), np.array([[5, 0], [5, 0]], np.int64)
    mats = {c.name: {"A": bad, "B": bad} for c in cands}
    mats["grid#0@A"] = {"A": good, "B": bad}
    mats["single:b"] = {"A": good, "B": good}  # ties grid#0@A on A with 1 member instead of 3
    ch = choose(cands, mats, "A")
    assert ch.chosen == "single:b" and ch.runner_up == "grid#0@A" and ch.margin == 0.0
    assert [n for n, _ in ch.ranking[:2]] == ["single:b", "grid#0@A"]
    assert choose(cands, mats, "all").chosen == "single:b"
    mats["grid#0@A"]["B"] = good
    mats["single:b"]["B"] = np.array([[4, 1], [0, 5]], np.int64)  # b slips on B only
    assert choose(cands, mats, "all").chosen == "grid#0@A"
    assert choose(cands, mats, "A").chosen == "single:b"  # A alone still ties: fewer members
    assert cands[0].size == 3 and cands[1].size == 1
    assert disagreement(cands[1], cands[1]) == 0 and disagreement(cands[1], cands[2]) == 1
    # S + 0.5 W with S = {a, b}: every member weighs 0.5, the plain mean up to scale
    assert disagreement(cands[0], cands[-1]) == pytest.approx(0.0, abs=1e-12)
    heavier = Candidate("x", "searched", {"s": ["a", "b"], "w": ["c"]}, {"w": 1.0})
    assert disagreement(heavier, cands[-1]) == pytest.approx(0.5 * (2 * (1 / 3 - 0.25) +
                                                                    (0.5 - 1 / 3)))
    assert fits_for("holdout") == ("A",) and fits_for("crossfit") == ("A", "B", "all")


@pytest.mark.parametrize("space", ["prob", "log"])
def test_the_plain_mean_is_a_point_of_the_group_structure_labelled_with_the_searched(space):
    """With groups holding every member once, the plain mean is the point ``n_g / n_0`` of
    their structure: every member weighs the same, it is labelled in the searched points'
    shared pass, and its labels are the float64 plain mean's argmax wherever that argmax is
    not a near-tie. A searched point equal to it is known as the mean; groups missing a member
    leave the mean as one group of all members."""
    from vspw_ray.ensemble.core.candidates import Candidate, all_candidates
    from vspw_ray.ensemble.core.rescore import FrameFusion

    rng = np.random.default_rng(5)
    c = 9
    groups = {"s": ["a", "b", "c"], "w": ["d", "e"], "x": ["f"]}
    keys = [m for ms in groups.values() for m in ms]
    probs = {m: torch.from_numpy(rng.dirichlet(np.full(c, 0.5), size=(24, 32))
                                 .transpose(2, 0, 1).astype(np.float32)) for m in keys}
    searched = [Candidate(f"grid#{i}@A", "searched", groups, {"w": w, "x": x})
                for i, (w, x) in enumerate([(1.4, 1.0), (0.2, 1.8), (2 / 3, 1 / 3)])]
    cands = all_candidates(searched, keys, {}, groups)
    mean = next(c_ for c_ in cands if c_.kind == "mean")
    assert "grid#2@A" not in [c_.name for c_ in cands]  # the same fusion, known as the mean
    assert mean.weights == {"w": 2 / 3, "x": 1 / 3}
    assert list(mean.member_weights().values()) == pytest.approx([1 / 3] * len(keys))
    plans = {c_.name: c_.plan(space, c) for c_ in cands}
    fusion = FrameFusion(plans)
    assert "mean" in [n for names in fusion.shared.values() for n in names]
    labels = fusion.labels(probs.items())["mean"]
    scores = np.stack([np.log(np.maximum(p.numpy().astype(np.float64), 1e-12)) if space == "log"
                       else p.numpy().astype(np.float64) for p in probs.values()]).mean(0)
    top2 = np.sort(scores, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], scores.argmax(0)[clear])
    partial = all_candidates(searched, [*keys, "g"], {}, groups)
    assert next(c_ for c_ in partial if c_.kind == "mean").groups == {"mean": [*keys, "g"]}


# ---------------------------------------------------------------------------------- store
def _write_members(store_uri, root, split, c, members):
    """Members' scores from the masks plus member-specific noise, through the real encoding."""
    from vspw_ray.scores import ScoreEncoding, ScoreStore, encode

    store, enc, lut = ScoreStore(store_uri), ScoreEncoding(scale=0.25, top_k=4), label_lut(c)
    for i, member in enumerate(members):
        gen = torch.Generator().manual_seed(i)
        store.write_manifest(member, {"num_classes": c, "encoding": {"params": enc.to_dict()}})
        for video in read_split(root, split):
            rows = []
            for frame in list_frames(root, video):
                gt = torch.from_numpy(reduce_mask(read_raw_mask(frame), lut).astype(np.int64))
                onehot = torch.nn.functional.one_hot(gt.clamp_max(c - 1), c).permute(2, 0, 1)
                logits = 2.5 * onehot + 1.5 * torch.randn(onehot.shape, generator=gen)
                e = encode(logits.softmax(0), enc)
                rows.append({"video": video, "frame": frame.name, "height": e.height,
                             "width": e.width, "score_height": e.classes.shape[1],
                             "score_width": e.classes.shape[2], "classes": e.classes.tobytes(),
                             "codes": e.codes.tobytes()})
            store.write_video(member, split, video, rows)


MEMBERS = ["m0", "m1", "m2", "m3"]
GROUPS = {"strong": ["m0", "m1"], "weak": ["m2"], "aux": ["m3"]}


@pytest.fixture(scope="module")
def member_store(tmp_path_factory, synth_root) -> str:
    uri = str(tmp_path_factory.mktemp("ensemble") / "store")
    _write_members(uri, synth_root, "val", 6, MEMBERS)
    return uri


@pytest.mark.parametrize("space", ["prob", "log"])
def test_store_grid_equals_brute_force_on_decoded_scores(member_store, synth_root, space):
    from vspw_ray.scores import ScoreStore, decode

    c, split, groups = 6, "val", GROUPS
    videos = read_split(synth_root, split)
    points = make_grid([grid_axis(0, 2, 0.5), grid_axis(0, 2, 0.5)])

    store, frames = ScoreStore(member_store), []
    enc = store.encoding("m0")
    for video in videos:
        stored = {m: dict(store.read_video(m, split, video)) for m in MEMBERS}
        for frame in list_frames(synth_root, video):
            p = {m: decode(stored[m][frame.name], c, enc) for m in stored}
            if space == "log":
                p = {m: v.clamp_min(1e-12).log() for m, v in p.items()}
            s = np.stack([((p["m0"] + p["m1"]) / 2).numpy(), p["m2"].numpy(), p["m3"].numpy()])
            frames.append((s, read_raw_mask(frame)))
    expected = np.zeros((len(points), c, c), np.int64)
    for p, w in enumerate(points):
        for s, raw in frames:
            fused = s[0] + np.float32(w[0]) * s[1] + np.float32(w[1]) * s[2]
            expected[p] += confusion(fused.argmax(0), raw, c, raw=True)

    jobs_seen = []

    def serial(fn, jobs):
        jobs_seen.extend(jobs)
        return map(fn, jobs)

    got = grid_search_store(member_store, groups, split, videos, str(synth_root),
                            points, space=space, shards=2, map_fn=serial, batch_frames=5)
    assert len(jobs_seen) == 2
    np.testing.assert_array_equal(got, expected)
    if space == "prob":  # the in-process default path, and a full-rate sample of the same frames
        np.testing.assert_array_equal(
            grid_search_store(member_store, groups, split, videos, str(synth_root),
                              points, processes=1), expected)
        # a full-rate sample, plain and with the box (settled pixels exact, contested pixels
        # with their candidate classes only), scores exactly as the grid
        for box in (None, [(0, 2), (0, 2)]):
            sample = sample_store(member_store, split, str(synth_root), videos, groups,
                                  rate=1.0, box=box, dtype=np.float32)
            for p in range(len(points)):
                assert sample_miou(sample, points[p]) == pytest.approx(mean_iou(expected[p]),
                                                                       abs=1e-12)
        _check_hull_sample(member_store, synth_root, videos, frames, c)


def _check_hull_sample(member_store, synth_root, videos, frames, c):
    """A full-rate member sample settled over the hull of GROUPS scores member-level fusions
    (shares inside the strong group) exactly as fusing every pixel does."""
    from vspw_ray.ensemble.core.sample import Hull, hull_miou
    from vspw_ray.scores import ScoreStore, decode

    hull = Hull(((0, 1), (2,), (3,)), 0.0, 2.0)
    sample = sample_store(member_store, "val", str(synth_root), videos,
                          {m: [m] for m in MEMBERS}, rate=1.0, hull=hull, dtype=np.float32)
    assert sample.fixed.sum() > 0 and sample.size > 0  # settled and contested pixels
    store = ScoreStore(member_store)
    enc = store.encoding("m0")
    decoded = []
    for video in videos:
        stored = {m: dict(store.read_video(m, "val", video)) for m in MEMBERS}
        for frame in list_frames(synth_root, video):
            decoded.append(([decode(stored[m][frame.name], c, enc).numpy() for m in MEMBERS],
                            read_raw_mask(frame)))
    for raw_inner, w in (([0.2, 0.8], (0.5, 1.5)), ([1, 0], (0.0, 0.0)), ([0, 1], (2.0, 0.3))):
        v = hull.member_weights(w, [raw_inner, [1], [1]])
        cm = np.zeros((c, c), np.int64)
        for ps, raw in decoded:
            fused = np.zeros_like(ps[0])
            for m in np.flatnonzero(v):
                fused += np.float32(v[m]) * ps[m]
            cm += confusion(fused.argmax(0), raw, c, raw=True)
        assert hull_miou(sample, v) == pytest.approx(mean_iou(cm), abs=1e-12), (raw_inner, w)


def test_shard_videos_covers_every_video_once():
    videos = [f"v{i}" for i in range(7)]
    shards = shard_videos(videos, 3)
    assert len(shards) == 3 and sum(shards, []) == videos
    assert shard_videos(videos[:2], 5) == [["v0"], ["v1"]]


def test_one_pass_decodes_each_member_once_per_frame(member_store, synth_root, monkeypatch):
    from vspw_ray.ensemble.core import grid
    from vspw_ray.ensemble.core.grid import group_frames

    calls = []
    real = grid.decode
    monkeypatch.setattr(grid, "decode",  # the name the one pass decodes with
                        lambda scores, *a, **k: calls.append(1) or real(scores, *a, **k))
    videos = read_split(synth_root, "val")
    frames = list(group_frames(member_store, "val", str(synth_root), videos, GROUPS))
    assert len(frames) == sum(len(list_frames(synth_root, v)) for v in videos)
    assert len(calls) == len(frames) * len(MEMBERS)  # membership checks decode nothing


def test_the_core_loads_no_ray_mlflow_or_optuna():
    """Every module of ``vspw_ray.ensemble.core`` imports in a fresh process without Ray, MLflow
    or Optuna (the stage shell around it uses them)."""
    import pkgutil
    import subprocess
    import sys

    import vspw_ray.ensemble.core as core

    names = [f"vspw_ray.ensemble.core.{m.name}" for m in pkgutil.iter_modules(core.__path__)]
    assert len(names) >= 7
    code = (f"import importlib, sys\nfor n in {names!r}:\n    importlib.import_module(n)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'optuna'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
