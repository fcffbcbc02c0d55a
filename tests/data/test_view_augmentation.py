# Batched MoCo-v2 views: equal to the old per-image code, same parameter distribution, read back from crafted images.
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from tests.data.reference_views import RecordingSource, UniformSource, moco_view, replay_of_view
from toolkit.data.synthetic import SyntheticFaces, SyntheticTrainSet
from toolkit.data.transforms import (UNIFORMS_PER_VIEW, ViewAugmentation, apply_views, draw_view_parameters,
                                     two_views_batch, view_parameters)

DEFAULT = ViewAugmentation()
# Configurations the old code handles through different branches: everything on, everything off, no hue, no flip.
CONFIGS = {
    "default": DEFAULT,
    "always": ViewAugmentation(color_jitter_p=1.0, grayscale_p=1.0, blur_p=1.0),
    "never": ViewAugmentation(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip=False),
    "no_hue_no_flip": ViewAugmentation(color_jitter=(0.8, 0.2, 0.9, 0.0), blur_sigma=(0.5, 3.0), flip=False),
}


def uniforms_of(seeds: list[int]) -> torch.Tensor:
    """The uniforms a sample's seed gives (the documented draw: 2 x 9 from a generator seeded with it)."""
    return torch.stack([torch.rand(2, UNIFORMS_PER_VIEW, generator=torch.Generator().manual_seed(s)) for s in seeds])


def sample_image(size: int, seed: int) -> torch.Tensor:
    """A [-1, 1] image with edges, flat areas, saturated colour and noise: 3 x S x S."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 1, 1, generator=gen) * 2 - 1 + 0.3 * torch.randn(3, size, size, generator=gen)
    image[:, : size // 3] = torch.rand(3, 1, 1, generator=gen) * 2 - 1
    image[0, :, size // 2:] = 1.0
    return image.clamp(-1, 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [16, 112])
def test_batched_views_equal_the_old_per_image_code_with_the_same_parameters(name, size):
    cfg = CONFIGS[name]
    seeds = [1000 * size + i for i in range(24)]
    images_B3HW = torch.stack([sample_image(size, s) for s in seeds])
    batched_B23HW = two_views_batch(images_B3HW, seeds, cfg)
    assert batched_B23HW.shape == (24, 2, 3, size, size) and batched_B23HW.dtype == torch.float32
    uniforms_B29 = uniforms_of(seeds)
    for i in range(len(seeds)):
        for view in range(2):
            expected = moco_view(images_B3HW[i], cfg, replay_of_view(uniforms_B29[i, view].tolist(), cfg))
            assert torch.allclose(batched_B23HW[i, view], expected, atol=2e-5, rtol=0), \
                (name, i, view, float((batched_B23HW[i, view] - expected).abs().max()))


def test_decoded_bytes_give_the_views_of_their_normalised_image():
    pixels_BHW3 = torch.randint(0, 256, (5, 40, 40, 3), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    normalised_B3HW = pixels_BHW3.permute(0, 3, 1, 2).float() / 127.5 - 1
    seeds = [21, 22, 23, 24, 25]
    from_bytes = two_views_batch(pixels_BHW3, seeds, CONFIGS["always"])
    assert torch.allclose(from_bytes, two_views_batch(normalised_B3HW, seeds, CONFIGS["always"]), atol=2e-6)
    with pytest.raises(ValueError, match=r"images of shape \(5, 40, 40, 3\) and dtype torch.int32"):
        two_views_batch(pixels_BHW3.int(), seeds, DEFAULT)


def test_a_sample_is_augmented_from_its_own_seed_whatever_its_batch():
    images_B3HW = torch.stack([sample_image(32, s) for s in range(6)])
    whole = two_views_batch(images_B3HW, [11, 12, 13, 14, 15, 16], DEFAULT)
    alone = two_views_batch(images_B3HW[3:4], [14], DEFAULT)
    assert torch.allclose(whole[3], alone[0], atol=1e-6)
    assert torch.equal(whole, two_views_batch(images_B3HW, [11, 12, 13, 14, 15, 16], DEFAULT))
    assert not torch.allclose(whole[0, 0], whole[0, 1])


# ----- the distribution of the parameters ------------------------------------------------------------

NUM_SAMPLES = 20_000   # 40,000 views: a probability p is estimated within 5 sigma = 5 sqrt(p (1 - p) / 40,000)


def assert_uniform(values: torch.Tensor, low: float, high: float, what: str) -> None:
    """Range, mean, spread and quartiles of `values` match U(low, high) within 5 standard errors."""
    n, width = values.numel(), high - low
    assert n > 500, what
    assert low - 1e-6 <= float(values.min()) and float(values.max()) <= high + 1e-6, (what, values.min(), values.max())
    assert float(values.min()) < low + 0.01 * width and float(values.max()) > high - 0.01 * width, what
    mean_error = width / math.sqrt(12 * n)
    assert abs(float(values.mean()) - (low + high) / 2) < 5 * mean_error, (what, float(values.mean()))
    assert abs(float(values.std()) - width / math.sqrt(12)) < 0.05 * width, (what, float(values.std()))
    for q in (0.25, 0.5, 0.75):
        assert abs(float(values.quantile(q)) - (low + q * width)) < 5 * width * math.sqrt(q * (1 - q) / n), (what, q)


def assert_product_of_uniforms(values: torch.Tensor, what: str) -> None:
    """Quantiles of `values` match those of a product of two independent U(0.6, 1.4) (strengths 0.4)."""
    products = torch.rand(200_000, 2, generator=torch.Generator().manual_seed(0)).mul(0.8).add(0.6).prod(1)
    assert 0.36 - 1e-5 <= float(values.min()) and float(values.max()) <= 1.96 + 1e-5, what
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(float(values.quantile(q)) - float(products.quantile(q))) < 0.025, (what, q)


def assert_probability(flags: torch.Tensor, p: float, what: str) -> None:
    n = flags.numel()
    assert abs(float(flags.float().mean()) - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-4) / n), \
        (what, float(flags.float().mean()), p)


def old_code_draws(cfg: ViewAugmentation, num_views: int) -> dict:
    """Every random number the old per-image code draws for num_views views, by what it is used for, with the
    ranges and chances it asks for: {name: (range or probability, values)}."""
    gen, image = torch.Generator().manual_seed(7), torch.zeros(3, 8, 112)   # 8 rows: room for radius 4
    draws: dict = defaultdict(list)
    asked: dict = {}
    for _ in range(num_views):
        source = RecordingSource(gen)
        moco_view(image, cfg, source)
        log = list(source.log)
        names = ["jitter_on"]
        if log[0][2]:
            names += ["brightness", "contrast", "saturation"] + (["hue"] if cfg.color_jitter[3] > 0 else [])
        names += ["grayscale_on", "blur_on"]
        if log[len(names) - 1][2]:
            names += ["blur_sigma"]
        names += ["flip_on"] if cfg.flip else []
        assert len(names) == len(log), (names, log)
        for name, (_, spec, value) in zip(names, log):
            asked.setdefault(name, spec)
            assert asked[name] == spec, (name, asked[name], spec)
            draws[name].append(float(value))
    return {name: (asked[name], torch.tensor(values)) for name, values in draws.items()}


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_parameter_distribution_is_the_one_the_old_code_specifies():
    cfg = DEFAULT
    params = draw_view_parameters(list(range(NUM_SAMPLES)), cfg, image_width=112)
    old = old_code_draws(cfg, 4_000)
    # The ranges and chances the old code asks for.
    assert old["jitter_on"][0] == 0.8 and old["grayscale_on"][0] == 0.2 and old["blur_on"][0] == 0.5
    assert old["flip_on"][0] == 0.5
    jittered = params.jitter_on_B2
    for name, new_values in (("brightness", params.brightness_B2[jittered]),
                             ("contrast", params.contrast_B2[jittered]),
                             ("saturation", params.saturation_B2[jittered]),
                             ("hue", params.hue_turns_B2[jittered]),
                             ("blur_sigma", params.blur_sigma_B2[params.blur_on_B2])):
        (low, high), old_values = old[name]
        assert_uniform(new_values.float(), low, high, f"new {name}")
        assert_uniform(old_values, low, high, f"old {name}")
        # Two-sample Kolmogorov-Smirnov distance between old and new draws, at a 1e-4 significance level.
        grid = torch.linspace(low, high, 201)
        cdf_new = (new_values.float()[:, None] <= grid).float().mean(0)
        cdf_old = (old_values[:, None] <= grid).float().mean(0)
        n, m = new_values.numel(), old_values.numel()
        assert float((cdf_new - cdf_old).abs().max()) < 2.2 * math.sqrt((n + m) / (n * m)), name
    for name, flags in (("jitter_on", params.jitter_on_B2), ("grayscale_on", params.grayscale_on_B2),
                        ("blur_on", params.blur_on_B2), ("flip_on", params.flip_on_B2)):
        p, old_flags = old[name]
        assert_probability(flags, p, f"new {name}")
        assert_probability(old_flags.bool(), p, f"old {name}")
    # Independence: the chances do not depend on each other or on the view (query or key).
    assert_probability(params.grayscale_on_B2[params.jitter_on_B2], 0.2, "gray given jitter")
    assert_probability(params.blur_on_B2[params.flip_on_B2], 0.5, "blur given flip")
    assert_probability(params.flip_on_B2[:, 1][params.flip_on_B2[:, 0]], 0.5, "key flip given query flip")
    assert_probability(params.jitter_on_B2[:, 1], 0.8, "key jitter")


def test_parameters_follow_the_configuration():
    cfg = ViewAugmentation(color_jitter=(0.9, 0.0, 1.5, 0.25), color_jitter_p=0.3, grayscale_p=1.0,
                           blur_sigma=(1.0, 3.0), blur_p=0.0, flip=False)
    params = draw_view_parameters(list(range(5_000)), cfg, image_width=56)
    assert_uniform(params.brightness_B2.flatten().float(), 0.1, 1.9, "brightness")
    assert torch.equal(params.contrast_B2, torch.ones_like(params.contrast_B2, dtype=params.contrast_B2.dtype))
    assert_uniform(params.saturation_B2.flatten().float(), 0.0, 2.5, "saturation (low end cut at 0)")
    assert_uniform(params.hue_turns_B2.flatten().float(), -0.25, 0.25, "hue")
    assert_uniform(params.blur_sigma_B2.flatten().float(), 0.5, 1.5, "sigma, scaled to 56 px")
    assert_probability(params.jitter_on_B2, 0.3, "jitter")
    assert bool(params.grayscale_on_B2.all()) and not bool(params.blur_on_B2.any()) and not bool(params.flip_on_B2.any())
    with pytest.raises(ValueError, match=r"B x 2 x 9"):
        view_parameters(torch.rand(4, 9), cfg, 56)


# ----- parameters read back from crafted images --------------------------------------------------------

_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
COLOUR = torch.tensor([0.5, 0.45, 0.4], dtype=torch.float64)       # a flat, slightly saturated colour in [0, 1]
LINE_X, BACKGROUND, LINE = 28, 0.45, 0.55                          # a bright vertical line on gray, off centre


def crafted_images(num_samples: int, height: int = 8, width: int = 112) -> torch.Tensor:
    """Even samples: the flat colour; odd samples: the vertical line. [-1, 1], B x 3 x H x W."""
    flat_3HW = COLOUR.float()[:, None, None].expand(3, height, width)
    line_3HW = torch.full((3, height, width), BACKGROUND)
    line_3HW[:, :, LINE_X] = LINE
    return torch.stack([flat_3HW if i % 2 == 0 else line_3HW for i in range(num_samples)]) * 2 - 1


def read_flat_colour(x_3HW: torch.Tensor) -> dict:
    """Brightness b, contrast times saturation c s, hue turns and grayscale of a view of the flat colour: jitter
    keeps it flat, multiplies its luma Y by b (contrast, saturation and hue keep Y), scales its chroma (I, Q) by
    b c s (contrast works on each channel's distance from the mean luma) and turns it by the hue; grayscale
    leaves Y' in all channels."""
    rgb = x_3HW.double().mean(dim=(1, 2))
    assert float((x_3HW.double() - rgb[:, None, None]).abs().max()) < 1e-5, "a flat image must stay flat"
    yiq, yiq_in = _YIQ @ rgb, _YIQ @ COLOUR
    b = float(yiq[0] / yiq_in[0])
    gray = float(rgb.max() - rgb.min()) < 1e-5
    chroma, chroma_in = complex(yiq[1], yiq[2]), complex(yiq_in[1], yiq_in[2])
    return {"b": b, "gray": gray, "cs": abs(chroma) / abs(chroma_in) / b,
            "hue": math.remainder(math.atan2(chroma.imag, chroma.real) - math.atan2(chroma_in.imag, chroma_in.real),
                                  2 * math.pi) / (2 * math.pi)}


def read_line(x_3HW: torch.Tensor, width: int = 112) -> dict:
    """Flip, b * c, blur kernel of a view of the line: brightness and contrast scale the line's excess over the
    background by b c, blur spreads it into the kernel (every row alike), flip moves it to the mirror column."""
    row = x_3HW[0].double().mean(dim=0)
    flipped = bool(row[width - 1 - LINE_X] > row[LINE_X])
    centre = width - 1 - LINE_X if flipped else LINE_X
    background = float(row[centre + 20])
    excess = row[centre - 10: centre + 11] - background          # 21 columns around the line
    taps = excess / excess.sum()
    return {"flipped": flipped, "bc": float(excess.sum()) / (LINE - BACKGROUND), "taps": taps}


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_parameters_read_back_from_crafted_images_have_the_specified_distribution():
    num_samples = 8_000
    images_B3HW = crafted_images(num_samples)
    views_B23HW = two_views_batch(images_B3HW, list(range(10**6, 10**6 + num_samples)), DEFAULT) * 0.5 + 0.5
    flats = [read_flat_colour(v) for v in views_B23HW[0::2].flatten(0, 1)]
    lines = [read_line(v) for v in views_B23HW[1::2].flatten(0, 1)]

    jittered = torch.tensor([abs(f["b"] - 1) > 1e-6 for f in flats])
    assert_probability(jittered, 0.8, "jitter, from the flat colour")
    assert_uniform(torch.tensor([f["b"] for f, j in zip(flats, jittered) if j]), 0.6, 1.4, "brightness read back")
    gray = torch.tensor([f["gray"] for f in flats])
    assert_probability(gray, 0.2, "grayscale read back")
    assert_probability(gray[jittered], 0.2, "grayscale given jitter, read back")
    coloured = [f for f, j, g in zip(flats, jittered, gray) if j and not g]
    assert_product_of_uniforms(torch.tensor([f["cs"] for f in coloured]), "contrast x saturation read back")
    assert_uniform(torch.tensor([f["hue"] for f in coloured]), -0.1, 0.1, "hue read back")
    unjittered = [f for f, j, g in zip(flats, jittered, gray) if not j and not g]
    assert all(abs(f["cs"] - 1) < 1e-5 and abs(f["hue"]) < 1e-6 for f in unjittered)

    assert_probability(torch.tensor([line["flipped"] for line in lines]), 0.5, "flip read back")
    # The line's views have their own jitter draw: b c is 1 without jitter, else a product of two U(0.6, 1.4).
    bc = torch.tensor([line["bc"] for line in lines])
    unchanged = (bc - 1).abs() < 1e-5
    assert_probability(~unchanged, 0.8, "jitter, from the line")
    assert_product_of_uniforms(bc[~unchanged], "brightness x contrast read back")

    # Blur: taps[10 +- k] is the kernel; sigma = sqrt(-1 / (2 ln(w1 / w0))), readable where w1 / w0 > 1e-3.
    sigmas, blurred = [], 0
    for line in lines:
        taps = line["taps"]
        if float(taps[11]) < 1e-3 * float(taps[10]):
            assert float(taps[10]) > 0.997   # no blur, or one too narrow to see
            continue
        blurred += 1
        sigma = math.sqrt(-1 / (2 * math.log(float(taps[11] / taps[10]))))
        radius = max(1, math.ceil(2 * sigma))
        expected = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        kernel = torch.zeros(21, dtype=torch.float64)
        kernel[10 - radius: 11 + radius] = expected / expected.sum()
        assert torch.allclose(taps, kernel, atol=2e-4), (sigma, taps, kernel)   # Gaussian, radius max(1, ceil(2 sigma))
        sigmas.append(sigma)
    visible_from = math.sqrt(-1 / (2 * math.log(1e-3)))                         # 0.269 px
    share_visible = (2.0 - visible_from) / (2.0 - 0.1)
    assert_probability(torch.arange(len(lines)) < blurred, 0.5 * share_visible, "visible blur read back")
    assert_uniform(torch.tensor(sigmas), visible_from, 2.0, "blur sigma read back")


# ----- arguments, and the synthetic data set's batched path --------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"color_jitter_p": 1.5}, "color_jitter_p=1.5"),
    ({"grayscale_p": -0.1}, "grayscale_p=-0.1"),
    ({"color_jitter": (0.4, -0.4, 0.4, 0.1)}, r"color_jitter=\(0.4, -0.4, 0.4, 0.1\)"),
    ({"blur_sigma": (2.0, 0.1)}, r"blur_sigma=\(2.0, 0.1\)"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViewAugmentation(**kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="3 sample seeds for a batch of 2"):
        two_views_batch(torch.zeros(2, 3, 16, 16), [1, 2, 3], DEFAULT)
    with pytest.raises(ValueError, match=r"images of shape \(2, 16, 16\)"):
        apply_views(torch.zeros(2, 16, 16), draw_view_parameters([1, 2], DEFAULT, 16))
    with pytest.raises(ValueError, match="blur radius 29 px needs images larger than 8x8"):   # 200 px at 112 = 14.3 at 8
        two_views_batch(torch.zeros(1, 3, 8, 8), [5], ViewAugmentation(blur_sigma=(200.0, 200.0), blur_p=1.0))


def test_synthetic_batches_equal_item_by_item_views():
    train_set = SyntheticTrainSet(SyntheticFaces(image_size=24, seed=1), 10, 4, views=DEFAULT)
    keys = [(3, 77), (17, 2**61 + 5), (3, 78)]
    batch = train_set.__getitems__(keys)
    for (views_23SS, label), key in zip(batch, keys):
        single, single_label = train_set[key]
        assert views_23SS.shape == (2, 3, 24, 24) and label == single_label == key[0] // 4
        assert torch.allclose(views_23SS, single, atol=1e-6)
    assert not torch.allclose(batch[0][0], batch[2][0])   # same image, other seed: other views
    image = train_set.faces.render(0, 3)
    uniforms_29 = uniforms_of([77])[0]
    for view in range(2):
        expected = moco_view(image, DEFAULT, replay_of_view(uniforms_29[view].tolist(), DEFAULT))
        assert torch.allclose(batch[0][0][view], expected, atol=2e-5)


def test_uniform_source_draws_like_the_old_code():
    """The reference's generator path is the old code: the same draws as torch.rand(1) one at a time."""
    source, gen = UniformSource(torch.Generator().manual_seed(3)), torch.Generator().manual_seed(3)
    assert [source.next() for _ in range(5)] == [float(torch.rand(1, generator=gen)) for _ in range(5)]
