# IJB protocol pieces: release parsing and its errors, template pooling, 1:1 TAR@FAR, 1:N rank-k and TPIR.
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from tests.eval.factories import write_ijb_release
from toolkit.errors import FaceCLError
from toolkit.eval.ijb import (identification_1toN, image_features, load_release, pool_templates, score_pairs,
                              verification_1to1)


def test_template_pooling_hand_computed():
    # Template 7: media 1 holds images (1,0) and (0,1), media 2 holds (1,0); template 9: one image (0,-1).
    feats = np.array([[1, 0], [0, 1], [1, 0], [0, -1]], np.float32)
    templates = np.array([7, 7, 7, 9])
    medias = np.array([1, 1, 2, 5])
    ids, pooled = pool_templates(feats, templates, medias)
    assert ids.tolist() == [7, 9]
    # media means (0.5, 0.5) and (1, 0); sum (1.5, 0.5); normalised.
    np.testing.assert_allclose(pooled[0], np.array([1.5, 0.5]) / np.hypot(1.5, 0.5), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], [0, -1])
    # Leaving image 1 out: media 1's mean is (1, 0), template (2, 0) -> (1, 0); template 9 unusable -> zeros.
    ids, pooled = pool_templates(feats, templates, medias, usable_I=np.array([True, False, True, False]))
    np.testing.assert_allclose(pooled, [[1, 0], [0, 0]])
    # Same media id in two templates are two different media.
    ids, pooled = pool_templates(np.array([[1, 0], [0, 1]], np.float32), np.array([1, 2]), np.array([3, 3]))
    np.testing.assert_allclose(pooled, [[1, 0], [0, 1]])


def test_image_features_normalise_then_weight():
    emb = np.array([[3, 4], [0, 2]], np.float32)
    out = image_features(emb, np.array([True, True]), np.array([0.5, 1.0]))
    np.testing.assert_allclose(out, [[0.3, 0.4], [0, 1]], rtol=1e-6)


def test_score_pairs_is_cosine():
    ids = np.array([2, 5, 9])
    feats = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    np.testing.assert_allclose(score_pairs(ids, feats, np.array([[2, 5], [9, 5], [2, 9]])), [0.6, 0.8, 0.0], atol=1e-7)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijbc")
    info = write_ijb_release(root, num_subjects=10, templates_per_subject=3)
    return root, info


def test_release_parsing(release_dir):
    root, info = release_dir
    release = load_release(root)
    assert release.name == "IJB-C" and release.num_images == len(info["images"])
    assert release.templates_I.tolist() == [im["template"] for im in info["images"]]
    assert release.landmarks_I52.shape == (release.num_images, 5, 2)
    assert set(release.identification) == {"G1", "G2", "probe"}
    num_templates = len(info["template_subject"])
    assert len(release.labels_P) == num_templates * (num_templates - 1) // 2


def test_1to1_matches_sklearn_on_synthetic_features(release_dir):
    root, info = release_dir
    release = load_release(root)
    rng = np.random.default_rng(0)
    subjects = np.array([im["subject"] for im in info["images"]])
    emb = rng.normal(0, 1, (10, 8))[subjects] + rng.normal(0, 1.0, (len(subjects), 8))
    status = np.zeros(len(subjects), np.int8)
    result, extras = verification_1to1(release, emb, status, fars=(1e-2, 1e-1))
    # Independent reference: per-template pooling written out with loops, scores, sklearn's ROC.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    templates = {}
    for im, f in zip(info["images"], unit):
        templates.setdefault(im["template"], {}).setdefault(im["media"], []).append(f)
    pooled = {t: sum(np.mean(v, axis=0) for v in media.values()) for t, media in templates.items()}
    pooled = {t: v / np.linalg.norm(v) for t, v in pooled.items()}
    scores = np.array([pooled[a] @ pooled[b] for a, b in release.pairs_P2])
    fpr, tpr, _ = roc_curve(release.labels_P, scores, drop_intermediate=False)
    for far in (1e-2, 1e-1):
        first = int(np.nonzero(fpr >= far - 1e-12)[0][0])
        assert result["tar_at_far"][f"{far:.0e}"]["tar"] == pytest.approx(tpr[first], abs=1e-9)
    assert result["num_genuine"] == int(release.labels_P.sum())


def test_skipped_images_and_empty_templates_are_counted(release_dir):
    root, info = release_dir
    release = load_release(root)
    emb = np.random.default_rng(1).normal(0, 1, (release.num_images, 8))
    status = np.zeros(release.num_images, np.int8)
    status[release.templates_I == 1] = 2  # every image of template 1
    result, _ = verification_1to1(release, emb, status, fars=(1e-1,))
    num_templates = len(info["template_subject"])
    assert result["num_pairs_with_empty_template"] == num_templates - 1


def test_1toN_on_a_constructed_gallery():
    # Gallery: subjects 0, 1, 2 (subject 2 has two templates); features along axes.
    gallery = {10: 0, 11: 1, 12: 2, 13: 2}
    probes = {20: 0, 21: 1, 22: 2, 23: 7, 24: 8}
    ids = np.array([10, 11, 12, 13, 20, 21, 22, 23, 24])
    e = np.eye(4, dtype=np.float32)
    feats = np.stack([e[0], e[1], e[2], e[3],
                      # probe 20 (subject 0): closest to subject 1, then 0 -> rank 2
                      [0.6, 0.8, 0, 0],
                      # probe 21 (subject 1): rank 1 with score 0.9
                      [0, 0.9, 0.436, 0],
                      # probe 22 (subject 2): best over templates 12 and 13 is 0.8 (template 13) -> rank 1
                      [0, 0, 0.6, 0.8],
                      # non-mated probes: best gallery scores 0.7 and 0.5
                      [0.7, 0, 0, 0.714], [0, 0.5, 0, 0]]).astype(np.float32)
    out = identification_1toN(gallery, probes, ids, feats, fpirs=(0.5, 1.0))
    assert out["num_mated"] == 3 and out["num_non_mated"] == 2 and out["num_gallery_subjects"] == 3
    assert out["rank1"] == pytest.approx(2 / 3) and out["rank5"] == 1.0
    # FPIR 0.5: k = 1, threshold = 0.714 (the larger non-mated best score): rank-1 hits with score >= 0.714
    # are probe 21 (0.9) and probe 22 (0.8) -> 2/3. FPIR 1.0: k = 2, threshold 0.5 -> still 2/3.
    assert out["tpir_at_fpir"]["5e-01"] == pytest.approx(2 / 3)
    assert out["tpir_at_fpir"]["1e+00"] == pytest.approx(2 / 3)
    # A higher threshold drops probe 22: make its score 0.7 (< 0.714).
    feats[6] = [0, 0, 0.714, 0.7]
    out = identification_1toN(gallery, probes, ids, feats / np.linalg.norm(feats, axis=1, keepdims=True),
                              fpirs=(0.5,))
    assert out["rank1"] == pytest.approx(2 / 3)


def test_ties_count_against_the_probe():
    gallery = {1: 0, 2: 1}
    probes = {3: 0}
    feats = np.array([[1, 0], [0, 1], [0.7071, 0.7071]], np.float32)
    out = identification_1toN(gallery, probes, np.array([1, 2, 3]), feats, ranks=(1, 2), fpirs=())
    assert out["rank1"] == 0.0 and out["rank2"] == 1.0


@pytest.mark.parametrize("file, line, match", [
    ("ijbc_template_pair_label.txt", "1 2 1 9", "expected 3 integer columns"),
    ("ijbc_face_tid_mid.txt", "1.jpg 1", "expected 3 columns"),
    ("ijbc_name_5pts_score.txt", "1.jpg 1 2 3", "expected 12 columns"),
])
def test_wrong_column_count_names_file_and_line(tmp_path, file, line, match):
    write_ijb_release(tmp_path, num_subjects=3, templates_per_subject=2, with_1n=False)
    path = tmp_path / "meta" / file
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(FaceCLError, match=match) as err:
        load_release(tmp_path)
    assert file in str(err.value)


def test_pairs_naming_unknown_templates_are_refused(tmp_path):
    write_ijb_release(tmp_path, num_subjects=3, templates_per_subject=2, with_1n=False)
    path = tmp_path / "meta" / "ijbc_template_pair_label.txt"
    path.write_text(path.read_text() + "1 999 0\n")
    with pytest.raises(FaceCLError, match="not in ijbc_face_tid_mid.txt .first: 999"):
        load_release(tmp_path)


def test_ijbb_prefix_is_detected(tmp_path):
    write_ijb_release(tmp_path, prefix="ijbb", num_subjects=3, templates_per_subject=2, with_1n=False)
    assert load_release(tmp_path).name == "IJB-B"


def test_training_evaluator_equals_the_offline_pipeline(release_dir):
    from tests.eval.factories import ColourNet
    from toolkit.eval.extract import extract_embeddings
    from toolkit.eval.ijb import IJBEvaluator, IJBImages

    root, _ = release_dir
    model = ColourNet(16).eval()
    full = IJBEvaluator(root, num_workers=0, fars=(1e-2, 1e-1))
    got = full.evaluate(model)
    release = load_release(root)
    emb, status = extract_embeddings(model, IJBImages(release), num_workers=0, progress=False)
    expected, _ = verification_1to1(release, emb, status, fars=(1e-2, 1e-1))
    assert got["TAR@FAR=1e-01"] == expected["tar_at_far"]["1e-01"]["tar"]
    assert got["TAR@FAR=1e-02"] == expected["tar_at_far"]["1e-02"]["tar"]
    assert got["num_pairs"] == len(release.labels_P) and got["num_skipped"] == 0
    # A subset: half genuine pairs at most, and only the images of its templates are embedded.
    subset = IJBEvaluator(root, max_pairs=60, num_workers=0, fars=(1e-1,))
    assert subset.evaluate(model)["num_pairs"] == 60
    assert len(subset.image_indices) <= release.num_images
    assert int(release.labels_P[subset.pair_indices].sum()) == 30


def test_ijbb_galleries_named_s1_s2_are_read_as_g1_g2(tmp_path):
    info = write_ijb_release(tmp_path, prefix="ijbb", num_subjects=4, templates_per_subject=2)
    for gallery, new in (("G1", "S1"), ("G2", "S2")):   # insightface's ijb_1n.py names IJB-B's galleries so
        meta = tmp_path / "meta"
        (meta / f"ijbb_1N_gallery_{gallery}.csv").rename(meta / f"ijbb_1N_gallery_{new}.csv")
    release = load_release(tmp_path)
    assert set(release.identification) == {"G1", "G2", "probe"} and release.identification_skipped is None
    assert all(release.identification["G1"][t] == info["template_subject"][t] for t in release.identification["G1"])


def test_some_but_not_all_1n_files_is_one_line_and_1to1_still_runs(tmp_path, caplog):
    write_ijb_release(tmp_path, num_subjects=4, templates_per_subject=2)
    (tmp_path / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    with caplog.at_level("WARNING", logger="toolkit.eval.ijb"):
        release = load_release(tmp_path)
    assert release.identification == {} and len(release.pairs_P2) > 0
    expected = f"1:N skipped: {tmp_path / 'meta'} lacks ijbc_1N_probe_mixed.csv (1:1 still evaluated)"
    assert release.identification_skipped == expected and [r.getMessage() for r in caplog.records] == [expected]
    (tmp_path / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    assert "lacks ijbc_1N_gallery_G2.csv or ijbc_1N_gallery_S2.csv, ijbc_1N_probe_mixed.csv" in \
        load_release(tmp_path).identification_skipped
    (tmp_path / "meta" / "ijbc_1N_gallery_G1.csv").unlink()   # none at all: a release without 1:N, no note
    assert load_release(tmp_path).identification_skipped is None


def test_a_folder_holding_ijb_releases_says_so_instead_of_becoming_an_identity_folder(tmp_path):
    from toolkit.eval.benchmark import benchmark_for

    write_ijb_release(tmp_path / "IJB_release" / "IJBB", prefix="ijbb", num_subjects=3, templates_per_subject=2,
                      with_1n=False)
    write_ijb_release(tmp_path / "IJB_release" / "IJBC", num_subjects=3, templates_per_subject=2, with_1n=False)
    with pytest.raises(FaceCLError) as error:
        benchmark_for(tmp_path / "IJB_release", "ijb")
    parent = tmp_path / "IJB_release"
    assert str(error.value) == (f"{parent} is not an IJB release but holds 2 (IJBB, IJBC): give each its own "
                                f"benchmark, e.g. --benchmark ijbb={parent / 'IJBB'} --benchmark ijbc={parent / 'IJBC'}")
    assert benchmark_for(parent / "IJBC", "ijbc").kind == "ijb"


def insightface_style_templates(emb_ID, scores_I, templates_I, medias_I):
    """insightface's eval_ijbc.py pooling written out as loops (use_norm_score=True, use_detector_score=True):
    image feature = flip-summed embedding x detector score (no normalisation), media = mean of its images,
    template = sum of its media, normalised."""
    feats = emb_ID * scores_I[:, None]
    out = {}
    for template in np.unique(templates_I):
        in_t = templates_I == template
        media_feats = [feats[in_t & (medias_I == m)].mean(axis=0) for m in np.unique(medias_I[in_t])]
        total = np.sum(media_feats, axis=0)
        out[int(template)] = total / np.linalg.norm(total)
    return out


def test_keep_image_norm_with_detector_scores_is_insightfaces_default_mode():
    rng = np.random.default_rng(3)
    templates_I = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3])
    medias_I = np.array([10, 10, 11, 20, 20, 30, 31, 31, 31])
    emb_ID = rng.normal(size=(9, 6)) * rng.uniform(0.2, 5.0, size=(9, 1))   # lengths that differ a lot
    scores_I = rng.uniform(0.3, 1.0, size=9)
    usable_I = np.ones(9, dtype=bool)
    expected = insightface_style_templates(emb_ID, scores_I, templates_I, medias_I)
    feats = image_features(emb_ID, usable_I, scores_I, keep_norm=True)
    ids, pooled = pool_templates(feats, templates_I, medias_I, usable_I)
    for template, row in zip(ids, pooled):
        np.testing.assert_allclose(row, expected[int(template)], rtol=1e-5, atol=1e-6)
    _, default = pool_templates(image_features(emb_ID, usable_I, scores_I), templates_I, medias_I, usable_I)
    assert np.abs(default - pooled).max() > 1e-2   # the default mode normalises each image first: it differs
