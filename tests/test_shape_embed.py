"""ShapeEmbed (family `shape_embed`) and the mask-geometry features it builds on (`shape_features`).

Synthetic shape classes (ellipses and rectangles of two aspect ratios, 3- and 5-lobed stars), each
drawn as a binary mask at a random rotation, translation and scale, check that the embedding is
invariant and separates the classes better than skimage regionprops features. All on CPU, one
torch thread (faster than two on a shared 2-core machine).
"""

from __future__ import annotations

import json

import numpy as np
import pyefd
import pytest
import torch
import zarr
from skimage.draw import polygon as draw_polygon
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bioembed_assets.encoders import EncoderSpec, build_encoder, build_from_spec, list_families
from bioembed_assets.encoders.checkpoints import save_state_dict_file
from bioembed_assets.encoders.shape import augment_contours, orbit_sq_errors, shape_inputs
from bioembed_assets.encoders.shape_features import (
    distance_matrices,
    efd_feature_names,
    efd_features,
    frobenius_normalize,
    mask_contours,
    outer_contour,
    regionprops_features,
    resample_closed,
    signed_area,
)
from bioembed_assets.inference import embed_crop_store_with_outputs, encoder_feature_names, encoder_outputs
from bioembed_assets.schema import BioembedInputError

SIZE = 64
TINY = dict(n_points=32, latent_dim=8, base_width=8, input_size=SIZE)
CLASSES = [("ellipse", 1.0), ("ellipse", 2.0), ("rect", 1.0), ("rect", 2.0), ("star", 3), ("star", 5)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outline(kind: tuple, n: int = 720) -> np.ndarray:
    """A shape class's closed outline (n, 2), unit area, centred at 0, axis-aligned."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    if kind[0] == "ellipse":
        r = 1.0 / np.sqrt((c / kind[1]) ** 2 + s**2)
    elif kind[0] == "rect":
        r = 1.0 / np.maximum(np.abs(c) / kind[1], np.abs(s))
    else:
        r = 1.0 + 0.3 * np.cos(kind[1] * t)
    p = np.stack([r * c, r * s], 1)
    return p / np.sqrt(abs(signed_area(p)))


def place(points: np.ndarray, angle: float, scale: float, shift: np.ndarray) -> np.ndarray:
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rot.T * scale + SIZE / 2 + shift


def rasterize(points: np.ndarray) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    rr, cc = draw_polygon(points[:, 0], points[:, 1], mask.shape)
    mask[rr, cc] = True
    return mask


def random_mask(kind: tuple, rng: np.random.Generator, scale: float | None = None) -> np.ndarray:
    """`kind` at a random rotation, translation (+-4 px) and (unless given) scale (area 14^2..22^2 px)."""
    scale = rng.uniform(14, 22) if scale is None else scale
    return rasterize(place(outline(kind), rng.uniform(0, 2 * np.pi), scale, rng.uniform(-4, 4, 2)))


def shape_set(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = [random_mask(kind, rng) for kind in CLASSES for _ in range(n_per_class)]
    return np.stack(masks), np.repeat(np.arange(len(CLASSES)), n_per_class)


def crops_for(masks: np.ndarray, channels: int = 2) -> np.ndarray:
    """Crops as the engine passes them (B, C, H, W); the shape encoder only checks their shape."""
    return np.random.default_rng(0).integers(0, 4096, (len(masks), channels, *masks.shape[1:])).astype(np.uint16)


def aligned_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative Frobenius distance of two normalised matrices (N, N) at the best start shift and orientation."""
    errs = orbit_sq_errors(torch.from_numpy(a[None]).float(), torch.from_numpy(b[None]).float())
    return float(np.sqrt(errs.min() * a.size) / np.linalg.norm(b))


# -- 1. contours and distance matrices --------------------------------------------------------------


def test_normalised_distance_matrix_is_exactly_rigid_and_scale_invariant() -> None:
    p = outline(("star", 5), 64)
    q = place(p, 1.1, 17.0, np.array([3.0, -2.0]))
    (dp, dq), norms = frobenius_normalize(distance_matrices(np.stack([p, q])))
    np.testing.assert_allclose(dq, dp, atol=1e-12)
    assert norms[1] / norms[0] == pytest.approx(17.0)
    assert np.allclose(np.diagonal(dp), 0) and np.allclose(dp, dp.T) and (dp >= 0).all()
    assert np.linalg.norm(dp) == pytest.approx(1.0)


def test_mask_contours_are_closed_equally_spaced_counter_clockwise() -> None:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = (yy - 30) ** 2 + (xx - 33) ** 2 <= 15**2
    border = np.zeros((SIZE, SIZE), bool)
    border[:20, :25] = True  # touches the crop border: still a closed curve around it
    contours, empty = mask_contours(np.stack([disk, border]), 48)
    assert contours.shape == (2, 48, 2) and not empty.any()
    radius = np.linalg.norm(contours[0] - [30, 33], axis=1)
    assert np.abs(radius - 15.0).max() < 0.6  # pixel digitisation of a radius-15 disk
    # equal arc length: on a square whose corners fall on samples, every chord is exactly one spacing
    square = np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]])
    samples = resample_closed(square, 16, phase=0.5)
    np.testing.assert_allclose(samples[:2], [[0.0, 0.5], [0.0, 1.5]])
    chords = np.linalg.norm(np.diff(np.vstack([samples, samples[:1]]), axis=0), axis=1)
    np.testing.assert_allclose(chords[chords > 0.99], 1.0)
    assert (chords > 0.99).sum() == 12 and np.allclose(chords[chords < 0.99], np.sqrt(0.5))  # across corners
    assert all(signed_area(c) > 0 for c in contours)
    assert signed_area(outer_contour(border)) == pytest.approx(20 * 25, rel=0.02)
    assert contours[1][:, 0].min() == pytest.approx(-0.5) and contours[1][:, 1].min() == pytest.approx(-0.5)


def test_rasterised_shapes_match_after_rotation_translation_and_scale() -> None:
    """Drawn as masks, a shape's normalised matrix moves only by resampling/pixel error (best start shift
    and orientation): < 7 % (the worst is a square, whose corners round off when drawn rotated), while
    every other class differs by more than 1.5x that."""
    rng = np.random.default_rng(3)
    for kind in CLASSES:
        base = outline(kind)
        same = [rasterize(place(base, rng.uniform(0, 2 * np.pi), rng.uniform(15, 21), rng.uniform(-4, 4, 2)))
                for _ in range(4)]
        others = [random_mask(k, rng, 18.0) for k in CLASSES if k != kind]
        masks = np.stack([rasterize(place(base, 0.0, 18.0, np.zeros(2))), *same, *others])
        d, _ = frobenius_normalize(distance_matrices(mask_contours(masks, 64)[0]))
        same_err = [aligned_error(d[i], d[0]) for i in range(1, 5)]
        other_err = [aligned_error(d[i], d[0]) for i in range(5, len(d))]
        assert max(same_err) < 0.07, (kind, same_err)
        assert min(other_err) > 1.5 * max(same_err), (kind, same_err, other_err)


def test_orbit_errors_equal_brute_force_over_shifts_and_reflection() -> None:
    g = torch.Generator().manual_seed(0)
    r, t = torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
    got = orbit_sq_errors(r, t)
    n = 16
    for b in range(2):
        for k in range(n):
            rolled = torch.roll(t[b], (-k, -k), (0, 1))
            flipped = torch.roll(t[b].flip((0, 1)), (-k, -k), (0, 1))
            assert float(got[b, k]) == pytest.approx(float(((r[b] - rolled) ** 2).mean()), abs=1e-5)
            assert float(got[b, n + k]) == pytest.approx(float(((r[b] - flipped) ** 2).mean()), abs=1e-5)


def test_invariant_encoder_ignores_start_point_and_orientation_plain_one_does_not() -> None:
    masks, _ = shape_set(1, seed=5)
    contours, _ = mask_contours(masks, 32)
    shifts, reverse = np.arange(len(masks)) * 5 + 3, np.arange(len(masks)) % 2 == 0
    moved = augment_contours(contours, shifts, reverse)
    assert not np.allclose(moved, contours)
    for invariant in (True, False):
        net = build_encoder("shape_embed", **TINY, invariant=invariant).module.eval()
        with torch.no_grad():
            a, b = (net.encoder(shape_inputs(c, torch.device("cpu"))[0]).numpy() for c in (contours, moved))
        if invariant:
            np.testing.assert_allclose(b, a, atol=1e-5)
        else:  # invariant only as far as training teaches it (a check that can fail)
            assert np.abs(b - a).max() > 1e-3


def test_empty_mask_is_an_error_naming_the_crop_or_a_flagged_zero_row() -> None:
    masks, _ = shape_set(1, seed=0)
    masks = masks[:4].copy()
    masks[2] = False
    with pytest.raises(ValueError, match="mask of crop 2 is empty"):
        mask_contours(masks, 32)
    enc = build_encoder("shape_embed", **TINY, efd_order=3)
    emb, side = enc.embed_with_outputs(crops_for(masks), masks)
    assert (emb[2] == 0).all() and (np.abs(emb[[0, 1, 3]]).sum(1) > 0).all()
    np.testing.assert_array_equal(side["shape_qc"][:, 0], [0, 0, 1, 0])
    assert (side["efd"][2] == 0).all()
    with pytest.raises(ValueError, match="pass masks"):
        enc.embed(crops_for(masks))
    with pytest.raises(ValueError, match=r"same B, H, W"):
        enc.embed(crops_for(masks)[:3], masks)
    with pytest.raises(ValueError, match=r"masks \(B, H, W\)"):
        mask_contours(masks[0], 32)


# -- 2. elliptic Fourier descriptors ----------------------------------------------------------------


def test_efd_features_equal_pyefd_on_the_same_contour() -> None:
    masks, _ = shape_set(2, seed=1)
    got = efd_features(masks, order=8)
    assert got.shape == (len(masks), 32) and got.dtype == np.float32
    for i, mask in enumerate(masks):
        direct = pyefd.elliptic_fourier_descriptors(outer_contour(mask), order=8, normalize=True)
        np.testing.assert_allclose(got[i], direct.ravel().astype(np.float32), rtol=1e-6, atol=1e-7)
    # normalised: harmonic 1 is (+-1, 0, 0, d); pyefd leaves the sign of a half-turn ambiguity
    np.testing.assert_allclose(np.abs(got[:, 0]), 1.0, atol=1e-6)
    np.testing.assert_allclose(got[:, 1:3], 0.0, atol=1e-6)
    names = efd_feature_names(8)
    assert names[:5] == ["AreaShape_EFD_1_a", "AreaShape_EFD_1_b", "AreaShape_EFD_1_c", "AreaShape_EFD_1_d",
                         "AreaShape_EFD_2_a"] and len(set(names)) == 32
    with pytest.raises(ValueError, match="order must be >= 1"):
        efd_features(masks, order=0)


# -- 3. synthetic shape classes: invariance and separation ------------------------------------------


def cv_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean 5-fold accuracy of 5-NN and logistic regression on standardised features."""
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = [cross_val_score(make_pipeline(StandardScaler(), clf), features, labels, cv=cv).mean()
              for clf in (KNeighborsClassifier(5), LogisticRegression(max_iter=2000))]
    return float(np.mean(scores))


def spread_ratio(features: np.ndarray, per_class: int = 8) -> float:
    """Mean distance to the class centre / smallest distance between class centres, standardised features."""
    z = (features - features.mean(0)) / (features.std(0) + 1e-9)
    e = z.reshape(-1, per_class, z.shape[1])
    centres = e.mean(1)
    within = np.linalg.norm(e - centres[:, None], axis=-1).mean()
    between = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(len(e), 1)]
    return float(within / between.min())


def test_briefly_trained_embedding_is_invariant_and_beats_regionprops() -> None:
    enc = build_encoder("shape_embed", **TINY, seed=0)
    module = enc.training_module()
    train_masks, _ = shape_set(25, seed=1)
    fixed = torch.from_numpy(train_masks[::5])
    images = torch.zeros(len(train_masks), 1, SIZE, SIZE)

    def eval_loss() -> float:
        module.eval()
        with torch.no_grad():
            return float(module(images[: len(fixed)], None, fixed)["loss"])

    before = eval_loss()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for _ in range(60):
        idx = rng.choice(len(train_masks), 32, replace=False)
        out = module(images[idx], None, torch.from_numpy(train_masks[idx]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)

    # (a) invariance: 8 copies per class at random rotations/translations (same size), standardised
    # features: spread within a class vs the distance between the two closest class centres.
    rng = np.random.default_rng(7)
    copies = np.stack([random_mask(kind, rng, 18.0) for kind in CLASSES for _ in range(8)])
    shape_ratio = spread_ratio(enc.embed(crops_for(copies), copies))
    regionprops_ratio = spread_ratio(regionprops_features(copies))
    assert shape_ratio < 0.3 and shape_ratio < 0.5 * regionprops_ratio, (shape_ratio, regionprops_ratio)

    # (b) separation at random rotation, translation and scale, same classifiers for both feature sets.
    masks, labels = shape_set(20, seed=0)
    shape_acc = cv_accuracy(enc.embed(crops_for(masks), masks), labels)
    regionprops_acc = cv_accuracy(regionprops_features(masks), labels)
    assert shape_acc >= 0.95 and shape_acc > regionprops_acc + 0.04, (shape_acc, regionprops_acc)


def test_training_objective_needs_masks_and_logs_float32() -> None:
    enc = build_encoder("shape_embed", **TINY, invariant=False)
    module = enc.training_module(["a", "b"])  # unsupervised: treatment classes are not used
    assert module.uses_masks and {id(p) for p in module.parameters()} == {id(p) for p in enc.module.parameters()}
    masks, _ = shape_set(1, seed=2)
    images = torch.zeros(len(masks), 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="needs the crop masks"):
        module(images, None)
    masks[1] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(images, None, torch.from_numpy(masks))
    assert set(out) == {"loss", "recon", "empty_masks"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert float(out["empty_masks"]) == pytest.approx(1 / len(masks))
    out["loss"].backward()


# -- 4. the pipeline's view: crops, names, checkpoints ----------------------------------------------


def test_embeds_a_crop_store_as_the_engine_passes_it(tmp_path) -> None:
    """Crops of 48 px in a zarr store are resized to the encoder's 64 px by the engine, masks included."""
    rng = np.random.default_rng(4)
    big = np.stack([random_mask(kind, rng, 18.0) for kind in CLASSES])
    masks = big[:, 8:56, 8:56]  # 48 px crops of the centre cell
    group = zarr.open_group(str(tmp_path / "crops.zarr"), mode="w")
    group.create_array("images", shape=(6, 2, 48, 48), dtype="uint16")[:] = crops_for(masks)
    group.create_array("masks", shape=(6, 48, 48), dtype="bool")[:] = masks
    group.attrs["channels"] = ["DNA", "AGP"]
    enc = build_encoder("shape_embed", **TINY, efd_order=4)
    emb, side = embed_crop_store_with_outputs(enc, tmp_path / "crops.zarr", batch_size=4)
    assert emb.shape == (6, 9) and emb.dtype == np.float32 and np.isfinite(emb).all()
    names = encoder_feature_names(enc)
    assert names == [f"ShapeEmbed_{i}" for i in range(8)] + ["ShapeEmbed_LogScale"]
    assert encoder_outputs(enc) == {"shape_qc": ["ShapeEmbed_EmptyMask"], "efd": efd_feature_names(4)}
    assert side["efd"].shape == (6, 16) and (side["shape_qc"] == 0).all()
    # log scale: log RMS contour distance in pixels of the 64 px input (crops upscaled by 4/3)
    up = torch.nn.functional.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)), size=(64, 64))
    contours, _ = mask_contours(up[:, 0].numpy() > 0.5, 32)
    _, frob = frobenius_normalize(distance_matrices(contours))
    np.testing.assert_allclose(emb[:, -1], np.log(frob / 32), rtol=1e-5)
    no_scale = build_encoder("shape_embed", **TINY, include_scale=False)
    assert no_scale.spec.embedding_dim == 8 and len(no_scale.feature_names) == 8
    assert "efd" not in no_scale.output_names


def test_safetensors_round_trip_gives_equal_outputs(tmp_path) -> None:
    assert "shape_embed" in list_families()
    enc = build_encoder("shape_embed", **TINY, seed=3)
    module = enc.training_module()
    masks, _ = shape_set(2, seed=6)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    for _ in range(2):
        opt.zero_grad()
        module(torch.zeros(len(masks), 1, SIZE, SIZE), None, torch.from_numpy(masks))["loss"].backward()
        opt.step()
    path = save_state_dict_file(enc.state_dict(), tmp_path / "shape.safetensors")
    spec = EncoderSpec.from_dict(json.loads(json.dumps(enc.spec.to_dict())))
    assert spec.trainable and spec.channels is None and spec.family == "shape_embed"
    fresh = build_from_spec(spec)
    x = crops_for(masks)
    assert not np.allclose(fresh.embed(x, masks), enc.embed(x, masks))
    fresh.load_file(path)
    np.testing.assert_array_equal(fresh.embed(x, masks), enc.embed(x, masks))
    a, b = fresh.reconstruct(x, masks), enc.reconstruct(x, masks)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["images"].shape == a["target"].shape == (len(masks), 1, 32, 32)
    with pytest.raises(ValueError, match="pass masks"):
        enc.reconstruct(x, mask_ratio=0.75, seed=0)  # how the training run asks for reconstructions
    wrong = build_encoder("shape_embed", **{**TINY, "n_points": 16})
    with pytest.raises(BioembedInputError, match="shape mismatch") as err:
        wrong.load_file(path)
    assert "shape.safetensors" in str(err.value)


def test_registry_round_trip(tmp_path) -> None:
    from bioembed_assets.registry import EncoderRegistry

    registry = EncoderRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    enc = build_encoder("shape_embed", **TINY, seed=4, efd_order=2)
    version = registry.register("shape_embed", enc, trained=True, alias="champion")
    loaded, got = registry.load("shape_embed")
    assert got.version == version.version and loaded.spec == enc.spec
    masks, _ = shape_set(1, seed=8)
    np.testing.assert_array_equal(loaded.embed(crops_for(masks), masks), enc.embed(crops_for(masks), masks))
