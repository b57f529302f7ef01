"""data/preprocess.py against GR1-Training's PreProcess.rgb_process outputs (../shared/fixtures/preprocess_rgb.pt), on
the CPU and (`pytest -m cuda`) on CUDA, held to the same 1e-5."""
import pytest
import torch

from config import Config
from conftest import DEVICES, shared_path, strict_device
from data.preprocess import ImagePreprocessor, random_shift

FIXTURE_CFG = Config().replace(rgb_static_pad=10, rgb_gripper_pad=4, rgb_shape=224, rgb_mean=[0.485, 0.456, 0.406],
                               rgb_std=[0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def fixture():
    return torch.load(shared_path("fixtures", "preprocess_rgb.pt"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


def _process(fixture, device: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pre = ImagePreprocessor(FIXTURE_CFG, strict_device(device))
    static, gripper = pre.process(fixture["inputs"]["rgb_static_uint8"].to(device),
                                  fixture["inputs"]["rgb_gripper_uint8"].to(device), train=train)
    return static.cpu(), gripper.cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_eval_matches_reference(fixture, device):
    static, gripper = _process(fixture, device, train=False)
    ref = fixture["outputs_train_False"]
    assert _max_diff(static, ref["rgb_static"]) <= 1e-5
    assert _max_diff(gripper, ref["rgb_gripper"]) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_train_matches_reference_with_seed_0(fixture, device, monkeypatch):
    """On CUDA the shifts come from the CUDA generator, which draws other numbers for the same seed: there the
    shifts are drawn from the CPU generator (the fixture's) and moved, so the grid_sample and resize arithmetic on
    CUDA is what is compared."""
    if device == "cuda":
        randint = torch.randint
        monkeypatch.setattr(torch, "randint", lambda *a, device=None, **k: randint(*a, **k).to(device))
    torch.manual_seed(0)  # the fixture's call: torch.manual_seed(0) then rgb_process(train=True)
    static, gripper = _process(fixture, device, train=True)
    ref = fixture["outputs_train_True_torch_manual_seed_0"]
    assert _max_diff(static, ref["rgb_static"]) <= 1e-5
    assert _max_diff(gripper, ref["rgb_gripper"]) <= 1e-5


def test_shift_alone_matches_reference_and_uses_the_global_rng(fixture):
    inputs, ref = fixture["inputs"], fixture["shift_aug_only_train_True_seed0_before_resize"]
    torch.manual_seed(0)
    static = random_shift(inputs["rgb_static_uint8"].float() * (1 / 255.0), 10)
    gripper = random_shift(inputs["rgb_gripper_uint8"].float() * (1 / 255.0), 4)
    assert torch.equal(static, ref["rgb_static"]) and torch.equal(gripper, ref["rgb_gripper"])
    torch.manual_seed(1)  # another seed gives another shift: the global RNG drives it
    assert not torch.equal(random_shift(inputs["rgb_static_uint8"].float() * (1 / 255.0), 10), ref["rgb_static"])


def test_shift_is_one_integer_offset_per_sample_for_all_frames():
    torch.manual_seed(3)
    images = torch.rand(2, 1, 3, 16, 16).expand(2, 3, 3, 16, 16).contiguous()  # three equal frames per sample
    out = random_shift(images, 2)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 0], out[:, 2])
    padded = torch.nn.functional.pad(images[:, 0], (2,) * 4, mode="replicate")
    for b in range(2):  # each sample equals some integer crop of its padded image
        errors = [(out[b, 0] - padded[b, :, y:y + 16, x:x + 16]).abs().max().item()
                  for y in range(5) for x in range(5)]
        assert min(errors) < 1e-4


def test_to_pixels_inverts_process_on_eval_path():
    pre = ImagePreprocessor(FIXTURE_CFG.replace(rgb_shape=200, patch_size=8), "cpu")  # resize to the same size
    images = torch.randint(0, 256, (1, 2, 3, 200, 200), dtype=torch.uint8)
    static, _ = pre.process(images, torch.zeros(1, 2, 3, 84, 84, dtype=torch.uint8), train=False)
    pixels = pre.to_pixels(static)
    assert pixels.shape == (1, 2, 3, 200, 200)
    assert (pixels - images.float()).abs().max().item() < 1e-3
    assert pre.to_pixels(torch.full((3, 4, 4), 100.0)).max().item() == 255.0  # clamped


def test_rejects_wrong_layout():
    pre = ImagePreprocessor(FIXTURE_CFG, "cpu")
    with pytest.raises(ValueError, match=r"\(batch, time, 3, height, width\)"):
        pre.process(torch.zeros(2, 200, 200, 3, dtype=torch.uint8), torch.zeros(1, 1, 3, 84, 84, dtype=torch.uint8),
                    train=False)


def test_zero_padding_turns_the_shift_off():
    pre = ImagePreprocessor(Config().replace(rgb_static_pad=0, rgb_gripper_pad=0, rgb_shape=32), "cpu")
    static_u8 = torch.randint(0, 256, (2, 3, 3, 200, 200), dtype=torch.uint8)
    gripper_u8 = torch.randint(0, 256, (2, 3, 3, 84, 84), dtype=torch.uint8)
    torch.manual_seed(0)
    train = pre.process(static_u8, gripper_u8, train=True)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # no random draw
    for a, b in zip(train, pre.process(static_u8, gripper_u8, train=False)):
        assert torch.equal(a, b)
