"""The judge's training-time softening (evals.soften) against scipy's float64 Gaussian filter."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from evals.soften import BLUR_SIGMAS, MAX_NOISE, gaussian_blur, soften


@pytest.mark.parametrize("sigma", BLUR_SIGMAS)
def test_blur_matches_scipy_float64(sigma):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(int(sigma * 10)))
    radius = int(np.ceil(3 * sigma))
    # torch's "reflect" padding is scipy's "mirror"; truncate so scipy's radius is ours.
    expected = ndimage.gaussian_filter(
        images.double().numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=radius / sigma
    )
    # float32 sums of <= 9 taps per pass on values in [0, 1]: errors ~1e-7; 1e-5 leaves margin.
    np.testing.assert_allclose(gaussian_blur(images, sigma).numpy(), expected, atol=1e-5)


def test_soften_touches_the_chosen_share_and_is_reproducible():
    images = torch.rand(400, 3, 16, 16)
    assert torch.equal(soften(images, 0.0), images)
    first = soften(images, 0.5, torch.Generator().manual_seed(1))
    again = soften(images, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    changed = (first - images).flatten(1).abs().amax(1) > 0
    # Binomial(400, 0.5): 200 +- 10; 4.5 sigma either side.
    assert 155 <= int(changed.sum()) <= 245
    everything = soften(images, 1.0, torch.Generator().manual_seed(2))
    assert bool(((everything - images).flatten(1).abs().amax(1) > 0).all())
    assert everything.min() >= 0 and everything.max() <= 1


def test_a_flat_image_stays_flat_up_to_the_noise():
    """The kernel sums to one: blur alone leaves a constant image unchanged."""
    flat = torch.full((64, 3, 16, 16), 0.4)
    softened = soften(flat, 1.0, torch.Generator().manual_seed(3))
    assert float((softened - 0.4).abs().max()) < 6 * MAX_NOISE
    assert abs(float(softened.mean()) - 0.4) < 1e-3
    for sigma in BLUR_SIGMAS:
        torch.testing.assert_close(gaussian_blur(flat, sigma), flat)
