"""Regroup 3D Classes: alignment, spectral clustering, the job and its command.

Oracles: known shifts and hand flips of synthetic maps; class volumes built from
known structures, so the right superclass partition is known exactly; particle
counts that must add up to the input.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetero_dask.core.align3d import (
    align_pairs,
    apply_alignment,
    flip_hand,
    invert_alignment,
    poses_after_alignment,
    shift_volume,
)
from hetero_dask.core.fourier import lowpass
from hetero_dask.core.spectral import (
    correlation_distance,
    kmeans,
    normalized_laplacian,
    self_tuning_affinity,
    size_weighted_embedding,
    spectral_cluster,
)

BOX = 32
PSIZE_A = 3.0


def blob_structure(seed: int, n: int = BOX, n_blobs: int = 12) -> np.ndarray:
    """An asymmetric (chiral) structure: Gaussian blobs at random places inside a sphere of radius n/4."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n), dtype=np.float32)
    for _ in range(n_blobs):
        c = rng.uniform(-n / 4, n / 4, size=3)
        s = rng.uniform(1.5, 3.0)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)).astype(
            np.float32
        )
    return vol


def class_volumes(n_per_group: int = 4, shift_px: float = 0.7, seed: int = 1):
    """12 class volumes from 3 structures: noise, small random shifts, low-pass 8-14 A.

    Returns (vols (3*n, N, N, N) float32, truth labels (3*n,)).
    """
    rng = np.random.default_rng(seed)
    structures = [blob_structure(s) for s in (10, 20, 30)]
    vols, truth = [], []
    for g, st in enumerate(structures):
        for _ in range(n_per_group):
            v = shift_volume(st, rng.uniform(-shift_px, shift_px, size=3))
            v = lowpass(v, rng.uniform(8.0, 14.0), PSIZE_A, ndim=3)
            v = v + 0.05 * st.max() * rng.standard_normal(v.shape).astype(np.float32)
            vols.append(v.astype(np.float32))
            truth.append(g)
    order = rng.permutation(len(vols))
    return np.stack(vols)[order], np.asarray(truth)[order]


def same_partition(a, b) -> bool:
    """True when two labelings define the same partition (labels may be renamed)."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- core/align3d ---------------------------------------------------------------------------


def test_shift_volume_integer_is_roll_and_composes():
    v = blob_structure(3)
    moved = shift_volume(v, [2, -1, 3])
    np.testing.assert_allclose(moved, np.roll(v, (3, -1, 2), axis=(0, 1, 2)), atol=1e-5)
    back = shift_volume(shift_volume(v, [1.3, -0.4, 2.2]), [-1.3, 0.4, -2.2])
    np.testing.assert_allclose(back, v, atol=1e-4)


def test_flip_hand_fixes_origin_and_is_involution():
    v = blob_structure(4)
    f = flip_hand(v)
    np.testing.assert_array_equal(flip_hand(f), v)
    c = BOX // 2
    np.testing.assert_array_equal(f[c], v[c])  # the z = 0 plane stays
    np.testing.assert_array_equal(f[c + 3], v[c - 3])
    assert not np.allclose(f, v)  # the structure is chiral


def test_align_pairs_recovers_subvoxel_shift_and_flip():
    v = blob_structure(5)
    true_shift = np.array([1.3, -2.6, 0.7])
    moved = shift_volume(v, -true_shift)  # shifting moved by +true_shift gives v back
    flipped = flip_hand(shift_volume(v, [2.0, 1.0, -1.0]))
    other = blob_structure(6)
    vols = np.stack([v, moved, flipped, other])
    res = align_pairs(vols, [(0, 1), (0, 2), (0, 3)], max_shift_px=5.0, try_flip=True)
    np.testing.assert_allclose(res.shift_px[0], true_shift, atol=0.1)
    assert not res.flipped[0] and res.correlation[0] > 0.99
    assert res.flipped[1] and res.correlation[1] > 0.999
    np.testing.assert_allclose(apply_alignment(flipped, res.shift_px[1], True), v, atol=1e-4)
    assert res.correlation[2] < 0.9


def test_align_pairs_respects_max_shift():
    v = blob_structure(7)
    far = shift_volume(v, [6.0, 0.0, 0.0])
    res = align_pairs(np.stack([v, far]), [(0, 1)], max_shift_px=3.0, try_flip=False)
    assert np.linalg.norm(res.shift_px[0]) <= 3.0 + 0.5 * np.sqrt(3.0)  # window + sub-voxel
    assert res.correlation[0] < 0.99
    res = align_pairs(np.stack([v, far]), [(0, 1)], max_shift_px=7.0, try_flip=False)
    np.testing.assert_allclose(res.shift_px[0], [-6.0, 0.0, 0.0], atol=0.05)
    assert res.correlation[0] > 0.999


# --- core/spectral --------------------------------------------------------------------------


def test_affinity_and_laplacian_of_two_disconnected_groups():
    # two tight groups far apart: the Laplacian has two zero eigenvalues
    d = np.full((6, 6), 100.0)
    for g in (range(3), range(3, 6)):
        for i in g:
            for j in g:
                d[i, j] = 0.0 if i == j else 1.0
    a = self_tuning_affinity(d, n_neighbors=2)
    np.testing.assert_allclose(np.diag(a), 0.0)
    np.testing.assert_allclose(a, a.T)
    np.testing.assert_allclose(a[0, 1], np.exp(-1.0))
    assert a[0, 4] < 1e-100
    evals = np.linalg.eigvalsh(normalized_laplacian(a))
    np.testing.assert_allclose(evals[:2], 0.0, atol=1e-10)
    assert evals[2] > 0.5
    res = spectral_cluster(d, 2, n_neighbors=2)
    np.testing.assert_array_equal(res.labels, [0, 0, 0, 1, 1, 1])


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 20)
    pts = centers[truth] + rng.standard_normal((60, 2))
    labels, _, inertia = kmeans(pts, 3, n_init=10, seed=4)
    labels2, _, inertia2 = kmeans(pts, 3, n_init=10, seed=4)
    np.testing.assert_array_equal(labels, labels2)
    assert inertia == inertia2
    assert same_partition(labels, truth)


def test_correlation_distance_matches_euclidean_of_unit_vectors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 40))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = correlation_distance(x @ x.T)
    ref = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.testing.assert_allclose(d, ref, atol=1e-7)


def test_spectral_cluster_recovers_three_structures_from_correlations():
    vols, truth = class_volumes()
    flat = vols.reshape(len(vols), -1) - vols.reshape(len(vols), -1).mean(1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    res = spectral_cluster(correlation_distance(flat @ flat.T), 3)
    assert same_partition(res.labels, truth)
    # the eigengap suggests M = 3: the largest step among the first eigenvalues is after the third
    assert int(np.argmax(np.diff(res.eigenvalues[:6]))) == 2


def test_size_weighted_embedding_is_the_particle_graph_reduced():
    """Against the explicit particle graph (one node per particle, class affinities
    between particles, 1 within a class): same smallest eigenvalues, and every
    particle's embedding row is its class's row (up to an orthogonal transform)."""
    rng = np.random.default_rng(3)
    sizes = np.array([4, 1, 2, 6, 3])
    x = rng.standard_normal((5, 7))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = self_tuning_affinity(correlation_distance(x @ x.T), n_neighbors=2)
    evals, rows = size_weighted_embedding(a, sizes, 3)
    cls = np.repeat(np.arange(5), sizes)
    big = a[cls][:, cls]
    big[cls[:, None] == cls[None, :]] = 1.0
    deg = big.sum(1)  # self-loops included
    lap = np.eye(len(cls)) - big / np.sqrt(np.outer(deg, deg))
    w, v = np.linalg.eigh(lap)
    np.testing.assert_allclose(evals[:3], w[:3], atol=1e-10)
    u = v[:, :3] / np.linalg.norm(v[:, :3], axis=1, keepdims=True)
    # same rows up to one orthogonal map: the Gram matrices agree
    np.testing.assert_allclose(u @ u.T, rows[cls] @ rows[cls].T, atol=1e-8)


def test_size_weighting_keeps_tiny_noisy_classes_from_deciding():
    """Two large classes of two close structures and three near-empty noisy classes
    that resemble each other: counting classes once
    groups the noise together; weighing them by particles splits the structures."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(400)
    s0 = base + 0.25 * rng.standard_normal(400)
    s1 = base + 0.25 * rng.standard_normal(400)
    blob = rng.standard_normal(400)
    vols = [s0, s0 + 0.05 * rng.standard_normal(400), s1]
    vols += [blob + 0.4 * rng.standard_normal(400) + 0.5 * v for v in (s0, s1, s1)]
    flat = np.array(vols) - np.mean(vols, axis=1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    d = correlation_distance(flat @ flat.T)
    sizes = np.array([300, 250, 280, 9, 6, 3])
    once = spectral_cluster(d, 2)
    weighted = spectral_cluster(d, 2, sizes=sizes)
    truth = np.array([0, 0, 1, 0, 1, 1])
    assert not same_partition(once.labels[:3], truth[:3]), once.labels.tolist()
    assert same_partition(weighted.labels[:3], truth[:3]), weighted.labels.tolist()
    wrong = min(
        sizes[weighted.labels != truth].sum(), sizes[weighted.labels == truth].sum()
    )
    assert wrong <= sizes[3:].sum()


def test_weighted_kmeans_counts_a_point_as_its_weight():
    pts = np.array([[0.0], [1.0], [10.0]])
    _, centers, inertia = kmeans(pts, 1, n_init=1, weights=[3, 1, 0])
    np.testing.assert_allclose(centers, [[0.25]])
    np.testing.assert_allclose(inertia, 3 * 0.25**2 + 0.75**2)
    with pytest.raises(ValueError, match="weights"):
        kmeans(pts, 2, weights=[1, 0, 0])


@pytest.mark.parametrize("n", [1, 3])
def test_kmeans_rejects_bad_cluster_count(n):
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(np.zeros((n, 2)), n + 1)


def test_invert_alignment_round_trip():
    a = blob_structure(8)
    s = np.array([1.0, -2.0, 3.0])
    for flipped in (False, True):
        b = apply_alignment(a, s, flipped)  # so the inverse must bring b back onto a
        back, f = invert_alignment(s, flipped)
        np.testing.assert_allclose(apply_alignment(b, back, f), a, atol=1e-4)


def test_poses_after_alignment_keep_the_particle_images():
    from hetero_dask.core.fourier import translate_ft
    from hetero_dask.core.projector import prepare_fourier_map, project_images
    from hetero_dask.core.rotations import pose_to_matrix

    rng = np.random.default_rng(2)
    vol = blob_structure(9)
    R = pose_to_matrix(rng.normal(size=(6, 3)).astype(np.float32))
    shifts = rng.uniform(-2, 2, size=(6, 2)).astype(np.float32)
    move = np.array([1.5, -2.0, 2.5])

    def images(v, rot, s):  # image model Y = P_R(k) e^{+2 pi i k.s/N}
        return translate_ft(project_images(prepare_fourier_map(v), rot), -s)

    before = images(vol, R, shifts)
    scale = np.abs(before).max()
    for flipped in (False, True):
        aligned = apply_alignment(vol, move, flipped)
        R2, s2 = poses_after_alignment(R, shifts, move, flipped)
        # trilinear projection of a moved map differs by a few % (interpolation)
        assert np.abs(before - images(aligned, R2, s2)).max() < 0.05 * scale
        R3, s3 = poses_after_alignment(R, shifts, -move, flipped)  # wrong direction
        assert np.abs(before - images(aligned, R3, s3)).max() > 0.3 * scale
    # without the pose change the flipped map does not explain the images
    assert np.abs(before - images(flip_hand(vol), R, shifts)).max() > 0.3 * scale


# --- jobs/regroup ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
    ) as lc:
        with Client(lc) as c:
            yield c


def particle_table(sizes, layout: str = "alignments_class", seed: int = 0) -> np.ndarray:
    """Fake particles with soft posteriors whose argmax gives ``sizes[k]`` particles in class k."""
    from hetero_dask.io.cs import empty_table, multi_class_fields, slot_fields, with_fields

    rng = np.random.default_rng(seed)
    k = len(sizes)
    labels = rng.permutation(np.repeat(np.arange(k), sizes))
    n = len(labels)
    post = rng.uniform(0.0, 0.5, size=(n, k)).astype(np.float32)
    post[np.arange(n), labels] = 1.0
    post /= post.sum(1, keepdims=True)
    pose = rng.normal(size=(n, k, 3)).astype(np.float32)
    shift = rng.uniform(-2, 2, size=(n, k, 2)).astype(np.float32)
    fields = slot_fields("alignments3D/", n, pose=pose[np.arange(n), labels], psize_A=PSIZE_A)
    fields["alignments3D/class"] = labels.astype(np.uint32)
    if layout == "alignments3D_multi":
        fields.update(multi_class_fields(pose, shift, post, split=rng.integers(0, 2, n)))
    elif layout != "class":
        for c in range(k):
            fields.update(
                slot_fields(
                    f"{layout}_{c}/",
                    n,
                    pose=pose[:, c],
                    shift=shift[:, c],
                    psize_A=PSIZE_A,
                    class_posterior=post[:, c],
                    class_=c,
                )
            )
    return with_fields(empty_table(n), fields)


def class_partition(result, classes):
    return result.superclass[np.asarray(classes)]


def check_counts(result, table):
    from hetero_dask.io.cs import read_cs

    out = result.out_dir
    regrouped = read_cs(out / "particles.cs")
    remaining = read_cs(out / "remaining_particles.cs")
    assert len(regrouped) + len(remaining) == len(table)
    assert sorted(np.concatenate([regrouped["uid"], remaining["uid"]]).tolist()) == sorted(
        table["uid"].tolist()
    )
    per_super = [len(read_cs(out / f"superclass_{m}" / "particles.cs")) for m in range(3)]
    assert sum(per_super) == len(regrouped)
    sizes = result.class_sizes
    for m in range(3):
        assert per_super[m] == sizes[result.superclass == m].sum()
    assert per_super == sorted(per_super, reverse=True)  # superclass 0 is the largest
    return regrouped, remaining


@pytest.mark.parametrize("align", [False, True])
def test_regroup_recovers_three_structures(tmp_path, client, align):
    from hetero_dask.io.cs import class_posteriors
    from hetero_dask.jobs.regroup import regroup

    vols, truth = class_volumes()
    sizes = np.arange(20, 20 + 5 * len(vols), 5)
    table = particle_table(sizes)
    res = regroup(
        table,
        vols,
        tmp_path,
        volumes_psize_A=PSIZE_A,
        client=client,
        num_superclasses=3,
        align_pairs=align,
        mask_radius=0.9,
    )
    assert same_partition(res.superclass, truth)
    assert (res.superclass >= 0).all() and res.flipped_pairs == []
    regrouped, remaining = check_counts(res, table)
    assert len(remaining) == 0
    post = class_posteriors(regrouped, "alignments_class")
    assert post.shape == (len(regrouped), 3)
    np.testing.assert_array_equal(post.sum(1), 1.0)
    by_uid = dict(zip(table["uid"].tolist(), table["alignments3D/class"].tolist(), strict=True))
    upstream = np.array([by_uid[u] for u in regrouped["uid"].tolist()])
    np.testing.assert_array_equal(np.argmax(post, 1), res.superclass[upstream])
    np.testing.assert_array_equal(regrouped["alignments3D/class"], res.superclass[upstream])
    for name in (
        "report.json",
        "volumes.zip",
        "affinity.png",
        "eigenvalues.png",
        "classes.png",
        "particles.csg",
        "superclass_2/map.mrc",
    ):
        assert (tmp_path / name).is_file(), name


def test_pair_alignment_is_needed_for_shifted_copies(tmp_path, client):
    from hetero_dask.jobs.regroup import regroup

    vols, truth = class_volumes(shift_px=3.0, seed=3)  # members shifted up to 3 px per axis
    table = particle_table(np.full(len(vols), 30))
    common = dict(volumes_psize_A=PSIZE_A, client=client, num_superclasses=3, mask_radius=0.9)
    plain = regroup(table, vols, tmp_path / "plain", **common)
    assert not same_partition(plain.superclass, truth)
    aligned = regroup(
        table, vols, tmp_path / "aligned", align_pairs=True, max_shift_A=18.0, **common
    )
    assert same_partition(aligned.superclass, truth)
    assert int(np.argmax(np.diff(aligned.eigenvalues[:6]))) == 2  # eigengap at M = 3


def test_hand_flipped_classes_join_and_are_reported(tmp_path, client):
    from hetero_dask.core.rotations import pose_to_matrix
    from hetero_dask.io.cs import read_cs
    from hetero_dask.io.mrc import read_map
    from hetero_dask.jobs.regroup import regroup

    rng = np.random.default_rng(4)
    a, b, c = (blob_structure(s) for s in (10, 20, 30))
    flips = np.array([False, False, True, True, False, False, False, False])
    sources = [a, a, a, a, b, b, c, c]
    vols = np.stack(
        [
            shift_volume(flip_hand(v) if f else v, rng.uniform(-1, 1, 3))
            + 0.02 * rng.standard_normal(v.shape).astype(np.float32)
            for v, f in zip(sources, flips, strict=True)
        ]
    ).astype(np.float32)
    sizes = np.array([60, 30, 30, 30, 30, 30, 30, 30])  # class 0 (unflipped) is the reference
    table = particle_table(sizes, seed=5)
    res = regroup(
        table,
        vols,
        tmp_path,
        volumes_psize_A=PSIZE_A,
        client=client,
        num_superclasses=3,
        align_pairs=True,
        mask_radius=0.9,
    )
    assert same_partition(res.superclass, [0, 0, 0, 0, 1, 1, 2, 2])
    assert sorted(map(tuple, res.flipped_pairs)) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    # the superclass average is in the hand of its largest member (class 0)
    avg, _ = read_map(tmp_path / f"superclass_{res.superclass[0]}" / "map.mrc")
    assert np.corrcoef(avg.ravel(), a.ravel())[0, 1] > 0.95
    assert np.corrcoef(avg.ravel(), flip_hand(a).ravel())[0, 1] < 0.8
    # particles of a flipped class get the mirrored pose F R F
    out = read_cs(tmp_path / "particles.cs")
    row_in = {u: i for i, u in enumerate(table["uid"].tolist())}
    k = res.superclass[2]
    for u, pose in zip(out["uid"], out[f"alignments_class_{k}/pose"], strict=True):
        i = row_in[int(u)]
        if table["alignments3D/class"][i] == 2:
            f = np.diag([1.0, 1.0, -1.0])
            expect = f @ pose_to_matrix(table["alignments_class_2/pose"][i].astype(np.float64)) @ f
            np.testing.assert_allclose(pose_to_matrix(pose.astype(np.float64)), expect, atol=1e-5)


def test_excluded_and_small_classes_go_to_remaining(tmp_path):
    import json

    from hetero_dask.jobs.regroup import regroup

    vols, truth = class_volumes()
    sizes = np.full(len(vols), 25)
    sizes[4] = 3  # under min_class_size
    table = particle_table(sizes)
    res = regroup(
        table,
        vols,
        tmp_path,
        volumes_psize_A=PSIZE_A,
        num_superclasses=3,
        exclude_classes=(0, 7),
        min_class_size=10,
        mask_radius=0.9,
    )
    aside = [0, 4, 7]
    np.testing.assert_array_equal(res.superclass[aside], -1)
    keep = np.setdiff1d(np.arange(len(vols)), aside)
    assert same_partition(res.superclass[keep], truth[keep])
    _, remaining = check_counts(res, table)
    assert len(remaining) == sizes[aside].sum()
    assert sorted(set(remaining["alignments3D/class"].tolist())) == aside
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_remaining_particles"] == sizes[aside].sum()
    status = {c["class"]: c["status"] for c in report["classes"]}
    assert status[0] == status[7] == "excluded" and status[4] == "too small"


def test_multi_layout_gets_one_hot_superclass_posteriors(tmp_path):
    from hetero_dask.io.cs import class_posteriors, detect_class_layouts, read_cs
    from hetero_dask.jobs.regroup import regroup

    vols, truth = class_volumes()
    table = particle_table(np.full(len(vols), 20), layout="alignments3D_multi")
    res = regroup(
        table, vols, tmp_path, volumes_psize_A=PSIZE_A, num_superclasses=3, mask_radius=0.9
    )
    out = read_cs(tmp_path / "particles.cs")
    assert detect_class_layouts(out) == {"alignments3D_multi": 3}
    post = class_posteriors(out)
    np.testing.assert_array_equal(post.sum(1), 1.0)
    np.testing.assert_array_equal(
        np.argmax(post, 1), res.superclass[table["alignments3D/class"].astype(int)]
    )
    # every superclass slot carries the particle's own upstream pose
    own = table["alignments3D_multi/pose"][np.arange(len(table)), table["alignments3D/class"]]
    np.testing.assert_allclose(out["alignments3D_multi/pose"][:, 1], own)


def test_cli_with_map_files_and_bad_input_messages(tmp_path, capsys):
    import json

    from hetero_dask.cli import main
    from hetero_dask.io.cs import write_cs
    from hetero_dask.io.mrc import write_map

    vols, truth = class_volumes()
    vdir = tmp_path / "vols"
    for k, v in enumerate(vols):
        write_map(vdir / f"class_{k:02d}.mrc", v, PSIZE_A)
    table = particle_table(np.full(len(vols), 15))
    write_cs(tmp_path / "p.cs", table)
    base = ["regroup", "--particles", str(tmp_path / "p.cs"), "--volumes", str(vdir)]
    rc = main(
        [
            *base,
            "--superclasses",
            "3",
            "--out",
            str(tmp_path / "out"),
            "--mask-radius",
            "0.9",
            "--exclude",
            "11",
            "--prefix",
            "J9_",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sc = np.array(
        [c["superclass"] if c["superclass"] is not None else -1 for c in report["classes"]]
    )
    assert same_partition(sc[:11], truth[:11]) and sc[11] == -1
    assert (tmp_path / "out" / "J9_remaining_particles.cs").is_file()
    assert (tmp_path / "out" / "superclass_0" / "J9_particles.cs").is_file()
    capsys.readouterr()
    # bad input: the error names the value
    for extra, needle in (
        (["--superclasses", "12"], "--superclasses (num_superclasses) = 12"),
        (["--superclasses", "0"], "--superclasses (num_superclasses) = 0"),
        (["--superclasses", "2", "--exclude", "3,12"], "[12]"),
    ):
        assert main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert needle in capsys.readouterr().err


def test_bad_inputs_are_named(tmp_path):
    from hetero_dask.io.mrc import write_map
    from hetero_dask.jobs.regroup import regroup

    vols, _ = class_volumes(n_per_group=1)
    table = particle_table(np.full(3, 10))
    kw = dict(volumes_psize_A=PSIZE_A, num_superclasses=1)
    with pytest.raises(ValueError, match="3 classes .* but 2 volumes"):
        regroup(table, vols[:2], tmp_path / "out", **kw)
    with pytest.raises(ValueError, match="every class is set aside"):
        regroup(table, vols, tmp_path / "out", exclude_classes=(0, 1, 2), **kw)
    with pytest.raises(ValueError, match=r"--superclasses \(num_superclasses\) = 3: expected 1..2"):
        regroup(table, vols, tmp_path / "out", volumes_psize_A=PSIZE_A, num_superclasses=3)
    only_class = particle_table(np.full(3, 10), layout="class")
    with pytest.raises(ValueError, match="class 2 but only 2 volumes"):
        regroup(only_class, vols[:2], tmp_path / "out", **kw)
    write_map(tmp_path / "a.mrc", vols[0], PSIZE_A)
    write_map(tmp_path / "b.mrc", vols[1], PSIZE_A * 1.1)
    write_map(tmp_path / "c.mrc", vols[2][:30, :30, :30], PSIZE_A)
    maps = [tmp_path / n for n in ("a.mrc", "b.mrc")]
    with pytest.raises(ValueError, match="b.mrc"):
        regroup(table, [*maps, tmp_path / "a.mrc"], tmp_path / "out", num_superclasses=1)
    with pytest.raises(ValueError, match="c.mrc"):
        regroup(
            table,
            [tmp_path / "a.mrc", tmp_path / "a.mrc", tmp_path / "c.mrc"],
            tmp_path / "out",
            num_superclasses=1,
        )


def test_star_particles_in_star_out(tmp_path, shared_data):
    from hetero_dask.io.star import particle_blocks, read_star, write_star
    from hetero_dask.jobs.regroup import regroup

    blocks = read_star(shared_data / "relion" / "relion31.star")
    _, parts, name = particle_blocks(blocks)
    parts = parts.copy()
    parts["rlnClassNumber"] = [1, 1, 2, 3, 3]  # 1-based
    write_star(tmp_path / "in.star", {**blocks, name: parts})
    vols, _ = class_volumes(n_per_group=1)
    res = regroup(
        tmp_path / "in.star",
        vols,
        tmp_path / "out",
        volumes_psize_A=PSIZE_A,
        num_superclasses=1,
        exclude_classes=(1,),
    )
    np.testing.assert_array_equal(res.superclass, [0, -1, 0])
    _, out, _ = particle_blocks(read_star(tmp_path / "out" / "particles.star"))
    _, rest, _ = particle_blocks(read_star(tmp_path / "out" / "remaining_particles.star"))
    assert out["rlnImageName"].tolist() == parts["rlnImageName"][[0, 1, 3, 4]].tolist()
    assert out["rlnClassNumber"].tolist() == [1, 1, 1, 1]
    assert rest["rlnImageName"].tolist() == [parts["rlnImageName"][2]]
    assert (tmp_path / "out" / "superclass_0" / "particles.star").is_file()


@pytest.mark.parametrize("k, n_tasks", [(2, 8), (5, 1), (12, 8), (50, 8)])
def test_pair_blocks_cover_every_pair_once(k, n_tasks):
    from hetero_dask.jobs.regroup import pair_blocks

    batches = pair_blocks(k, n_tasks)
    pairs = np.concatenate(batches)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert sorted(map(tuple, pairs.tolist())) == sorted(zip(*np.triu_indices(k, 1), strict=True))
    assert len(batches) >= min(n_tasks, k * (k - 1) // 2) or len(batches) == k * (k - 1) // 2


def test_user_mask_is_used_copied_and_checked(tmp_path):
    from hetero_dask.core.fourier import radius_3d, soft_edge
    from hetero_dask.io.mrc import write_map
    from hetero_dask.jobs.regroup import regroup

    vols, truth = class_volumes()
    table = particle_table(np.full(len(vols), 10))
    write_map(tmp_path / "m.mrc", soft_edge(radius_3d(BOX, np), 12, 3), PSIZE_A)
    res = regroup(
        table,
        vols,
        tmp_path / "out",
        volumes_psize_A=PSIZE_A,
        num_superclasses=3,
        mask=tmp_path / "m.mrc",
    )
    assert same_partition(res.superclass, truth)
    assert (tmp_path / "out" / "mask.mrc").read_bytes() == (tmp_path / "m.mrc").read_bytes()
    write_map(tmp_path / "small.mrc", np.ones((16, 16, 16), np.float32), PSIZE_A)
    with pytest.raises(ValueError, match="small.mrc is 16"):
        regroup(
            table,
            vols,
            tmp_path / "bad",
            volumes_psize_A=PSIZE_A,
            num_superclasses=3,
            mask=tmp_path / "small.mrc",
        )


def test_size_weighting_needs_a_populated_class_per_superclass():
    from hetero_dask.jobs.regroup import RegroupParams, select_classes

    sizes = np.array([50, 0, 0, 0])
    weighted = RegroupParams(num_superclasses=2, min_class_size=0)
    with pytest.raises(ValueError, match="only 1 included classes hold particles"):
        select_classes(sizes, weighted)
    once = RegroupParams(num_superclasses=2, min_class_size=0, weight_by_size=False)
    np.testing.assert_array_equal(select_classes(sizes, once), [0, 1, 2, 3])
