"""The region-embedding library on its own (`ovdistill.pipeline.region_embedding`): the
settings a regions config hands the oracle, the table helpers, the crop scale and resize mode
that reach the crops, `embed_regions`'s rejects and images without proposals, and the CUDA
stream plumbing (per-thread crop streams, the ready event, the consumer's wait), the last with
stand-in stream / event objects so it runs without a GPU."""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torchvision import transforms as T

from ovdistill.pipeline import region_embedding as re_mod
from ovdistill.pipeline.clip_teacher import Teacher
from ovdistill.pipeline.crops import combine_views, region_crops
from ovdistill.pipeline.images import ImageError
from ovdistill.pipeline.region_embedding import (
    BOX_SLACK,
    boxes_array,
    crop_stream,
    embed_regions,
    ready_on_current_stream,
    settings_from_config,
    streamed_crops,
    teacher_crops,
    with_embeddings,
)

SIZE = 8  # the toy teacher's input side
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SCHEMA = pa.schema([("image_id", pa.int64()), ("rank", pa.int32()),
                    ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32())])


class FlatEncoder(torch.nn.Module):
    """Every normalised crop pixel is a feature: different crops, different embeddings."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)


def toy_teacher(squash: bool = False) -> Teacher:
    """A CPU teacher with `FlatEncoder` and a bicubic shortest-side (or squash) preprocess."""
    resize = [T.Resize((SIZE, SIZE), interpolation=T.InterpolationMode.BICUBIC)] if squash \
        else [T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIZE)]
    pp = T.Compose([*resize, T.ToTensor(), T.Normalize(MEAN, STD)])
    return Teacher(model=FlatEncoder(), preprocess=pp, tokenizer=None, identity={},
                   embed_dim=3 * SIZE * SIZE, image_size=SIZE, mean=MEAN, std=STD,
                   device="cpu")


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def proposals(rows: list[tuple[int, list[list[float]]]]) -> pa.Table:
    iid, rank, box, score = [], [], [], []
    for i, boxes in rows:
        for r, b in enumerate(boxes):
            iid.append(i)
            rank.append(r)
            box.append([float(v) for v in b])
            score.append(1.0)
    return pa.table([iid, rank, box, score], schema=SCHEMA)


def reference(teacher: Teacher, image: Image.Image, boxes, scale: float) -> torch.Tensor:
    """normalize(V(1x) + V(scale x)) the direct way: one image, one encoder call."""
    crops = region_crops(as_tensor(image), torch.tensor(boxes, dtype=torch.float32), SIZE,
                         MEAN, STD, scale)
    return combine_views(teacher.encode_images(crops))


def stored(table: pa.Table) -> torch.Tensor:
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.float32).reshape(len(table), -1))


IMAGES = {1: noise_image(1, 40, 30), 2: noise_image(2, 36, 44), 3: noise_image(3, 30, 30)}
BOXES = {1: [[2.0, 3.0, 20.0, 25.0], [15.5, 4.0, 38.0, 16.5]],
         2: [[5.0, 5.0, 30.0, 12.0]],
         3: [[0.0, 0.0, 30.0, 30.0], [10.0, 8.0, 16.0, 22.0]]}


def loader(bad: dict | None = None):
    """load(source): the PIL image of IMAGES[int(source)]; sources in `bad` raise ImageError."""
    def load(source):
        if bad and source in bad:
            raise ImageError(bad[source])
        return IMAGES[int(source)]
    return load


# ----------------------------------------------------------------------------- settings


def test_settings_from_config_keeps_exactly_the_embed_settings():
    config = {"batch_size": 8, "context_scale": 2.0, "decode_threads": 0, "split": "train",
              "teacher": "x"}
    assert settings_from_config(config) == {"batch_size": 8, "context_scale": 2.0,
                                            "decode_threads": 0}
    assert settings_from_config({"context_scale": 1.25}) == {"context_scale": 1.25}
    assert settings_from_config({"split": "val"}) == {}


# ----------------------------------------------------------------------------- tables


def test_with_embeddings_names_the_mismatch_and_converts_to_float16():
    table = proposals([(1, BOXES[1] + [[0, 0, 1, 1]])])
    with pytest.raises(ValueError, match=r"^3 proposal rows but 2 embeddings$"):
        with_embeddings(table, torch.zeros(2, 4))
    emb = torch.tensor([[0.1, -2.5, 3.0], [1e-3, 0.5, 7.0], [65504.0, 0.0, -1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        out = with_embeddings(table, emb.to(dtype))
        assert out.schema.field("embedding").type == pa.list_(pa.float16(), 3)
        got = out.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        want = emb.to(dtype).to(torch.float16).numpy().reshape(-1)
        assert got.dtype == np.float16 and np.array_equal(got, want)


def test_boxes_array_is_float32_rows_of_four():
    table = proposals([(1, [[1.5, 2.0, 3.25, 4.0], [0.0, 0.5, 9.0, 7.75]])])
    got = boxes_array(table)
    assert got.dtype == np.float32 and got.shape == (2, 4)
    assert np.array_equal(got, np.array([[1.5, 2.0, 3.25, 4.0], [0.0, 0.5, 9.0, 7.75]],
                                        np.float32))


# ----------------------------------------------------------------------------- crops


def test_teacher_crops_follow_a_squash_preprocess():
    """A teacher that resizes straight to S x S gets squashed crops, not centre-cropped ones."""
    image = as_tensor(IMAGES[1])
    boxes = torch.tensor([[2.0, 3.0, 30.0, 10.0]])  # 28 x 7: the modes differ a lot
    got = teacher_crops(toy_teacher(squash=True), image, boxes)
    squash = region_crops(image, boxes, SIZE, MEAN, STD, 1.5, "bicubic", "squash")
    shortest = region_crops(image, boxes, SIZE, MEAN, STD, 1.5, "bicubic", "shortest")
    assert torch.equal(got, squash)
    assert (squash - shortest).abs().max() > 0.5
    assert torch.equal(teacher_crops(toy_teacher(), image, boxes), shortest)


def test_streamed_crops_use_the_given_scale_and_default_to_1_5_off_cuda():
    teacher, image = toy_teacher(), as_tensor(IMAGES[2])
    boxes = torch.tensor(BOXES[2])
    crops, ready = streamed_crops(teacher, image, boxes, 2.0)
    assert ready is None
    assert torch.equal(crops, teacher_crops(teacher, image, boxes, 2.0))
    assert (crops[1:] - teacher_crops(teacher, image, boxes, 1.5)[1:]).abs().max() > 0.5
    default, ready = streamed_crops(teacher, image, boxes)
    assert ready is None and torch.equal(default, teacher_crops(teacher, image, boxes, 1.5))


# ----------------------------------------------------------------------------- embed_regions


def test_embed_regions_uses_its_context_scale():
    teacher = toy_teacher()
    table, rejects = embed_regions(teacher, proposals([(1, BOXES[1]), (2, BOXES[2])]),
                                   [(2, "2"), (1, "1")], batch_size=3, context_scale=2.0,
                                   decode_threads=0, load=loader())
    assert rejects == [] and table.column("image_id").to_pylist() == [1, 1, 2]
    want = torch.cat([reference(teacher, IMAGES[1], BOXES[1], 2.0),
                      reference(teacher, IMAGES[2], BOXES[2], 2.0)])
    other = torch.cat([reference(teacher, IMAGES[1], BOXES[1], 1.5),
                       reference(teacher, IMAGES[2], BOXES[2], 1.5)])
    assert (want - other).abs().max() > 0.05  # the scale shows in the embedding
    assert torch.allclose(stored(table), want, atol=2e-3)


def test_an_image_without_proposals_has_no_rows_and_is_no_reject():
    teacher = toy_teacher()
    files = [(1, "1"), (2, "2"), (3, "3")]  # image 2 has no proposal rows
    table, rejects = embed_regions(teacher, proposals([(1, BOXES[1]), (3, BOXES[3])]), files,
                                   batch_size=4, decode_threads=0, load=loader())
    assert rejects == []
    assert table.column("image_id").to_pylist() == [1, 1, 3, 3]
    want = torch.cat([reference(teacher, IMAGES[1], BOXES[1], 1.5),
                      reference(teacher, IMAGES[3], BOXES[3], 1.5)])
    assert torch.allclose(stored(table), want, atol=2e-3)
    # and when no image of the call has any proposal at all
    empty, rejects = embed_regions(teacher, proposals([(1, BOXES[1])]), [(2, "2")],
                                   decode_threads=0, load=loader())
    assert rejects == [] and len(empty) == 0


def test_an_undecodable_image_is_a_reject_with_its_id_file_and_reason():
    teacher = toy_teacher()
    table, rejects = embed_regions(
        teacher, proposals([(1, BOXES[1]), (2, BOXES[2]), (3, BOXES[3])]),
        [(1, "1"), (2, "2"), (3, "3")], batch_size=2, decode_threads=2,
        load=loader({"2": "2: cannot identify image file"}))
    assert rejects == [{"item": 2, "file": "2", "reason": "2: cannot identify image file"}]
    assert table.column("image_id").to_pylist() == [1, 1, 3, 3]
    want = torch.cat([reference(teacher, IMAGES[1], BOXES[1], 1.5),
                      reference(teacher, IMAGES[3], BOXES[3], 1.5)])
    assert torch.allclose(stored(table), want, atol=2e-3)


def test_every_image_rejected_leaves_an_empty_table():
    table, rejects = embed_regions(toy_teacher(), proposals([(1, BOXES[1])]), [(1, "1")],
                                   decode_threads=0, load=loader({"1": "1: truncated"}))
    assert rejects == [{"item": 1, "file": "1", "reason": "1: truncated"}]
    assert len(table) == 0 and "embedding" in table.column_names


@pytest.mark.parametrize("side", ["x", "y"])
def test_boxes_beyond_the_image_on_one_axis_reject_it(side):
    """Image 3 is 30 x 30: a box reaching past the slack on either axis alone is a reject."""
    far = [4.0, 4.0, 31.5, 20.0] if side == "x" else [4.0, 4.0, 20.0, 31.5]
    table, rejects = embed_regions(toy_teacher(), proposals([(1, BOXES[1]), (3, [far])]),
                                   [(1, "1"), (3, "3")], decode_threads=0, load=loader())
    assert rejects == [{"item": 3, "file": "3", "reason":
                        "3: proposal boxes reach beyond the 30x30 image; it changed since "
                        "the proposals were made"}]
    assert table.column("image_id").to_pylist() == [1, 1]


@pytest.mark.parametrize("side", ["x", "y"])
def test_a_box_may_overshoot_by_exactly_the_slack(side):
    teacher = toy_teacher()
    edge = 30 + BOX_SLACK
    box = [4.0, 4.0, edge, 20.0] if side == "x" else [4.0, 4.0, 20.0, edge]
    table, rejects = embed_regions(teacher, proposals([(3, [box])]), [(3, "3")],
                                   decode_threads=0, load=loader())
    assert rejects == [] and table.column("image_id").to_pylist() == [3]
    assert torch.allclose(stored(table), reference(teacher, IMAGES[3], [box], 1.5), atol=2e-3)


# ----------------------------------------------------------------------------- CUDA streams


class FakeStream:
    """Stands in for torch.cuda.Stream: a device (None: the current one) and what it saw."""

    current_index = 1  # what the patched torch.cuda.current_device returns

    def __init__(self, device=None):
        device = torch.device("cuda", self.current_index) if device is None \
            else torch.device(device)
        if device.index is None:
            device = torch.device("cuda", self.current_index)
        self.device = device
        self.waited: list = []

    def wait_event(self, event):
        self.waited.append(event)


@pytest.fixture
def fake_cuda(monkeypatch):
    made: list[FakeStream] = []

    def stream(device=None):
        s = FakeStream(device)
        made.append(s)
        return s

    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: FakeStream.current_index)
    monkeypatch.setattr(re_mod, "_streams", threading.local())
    return made


def test_crop_stream_is_none_off_cuda(fake_cuda):
    assert crop_stream("cpu") is None and crop_stream(torch.device("cpu")) is None
    assert fake_cuda == []


def test_crop_stream_is_one_stream_per_thread_on_the_asked_device(fake_cuda):
    s = crop_stream("cuda")  # no index: the current device (1)
    assert isinstance(s, FakeStream) and s.device == torch.device("cuda", 1)
    assert crop_stream("cuda") is s and crop_stream("cuda:1") is s  # kept, not remade
    assert len(fake_cuda) == 1
    s0 = crop_stream("cuda:0")  # another device: a stream there
    assert s0 is not s and s0.device == torch.device("cuda", 0)
    assert crop_stream(torch.device("cuda", 0)) is s0 and len(fake_cuda) == 2
    other = []
    t = threading.Thread(target=lambda: other.append(crop_stream("cuda:0")))
    t.start()
    t.join()
    assert other[0] is not s0 and other[0].device == torch.device("cuda", 0)
    assert crop_stream("cuda:0") is s0


class FakeEvent:
    def __init__(self):
        self.recorded_on = "never"

    def record(self, stream=None):
        self.recorded_on = stream


def test_streamed_crops_are_made_on_the_crop_stream_and_its_event_recorded(monkeypatch):
    stream = FakeStream("cuda:0")
    active: list = []
    seen: list = []

    @contextlib.contextmanager
    def use(s):  # torch.cuda.stream: None is a no-op
        active.append(s)
        try:
            yield
        finally:
            active.pop()

    real = re_mod.teacher_crops

    def spy(*args, **kwargs):
        seen.append(active[-1] if active else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(re_mod, "crop_stream", lambda device: stream)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(re_mod, "teacher_crops", spy)
    teacher, image, boxes = toy_teacher(), as_tensor(IMAGES[1]), torch.tensor(BOXES[1])
    crops, ready = streamed_crops(teacher, image, boxes, 1.5)
    assert seen == [stream]  # the crops were made with the crop stream current
    assert isinstance(ready, FakeEvent) and ready.recorded_on is stream
    assert torch.equal(crops, real(teacher, image, boxes, 1.5))


class FakeCrops:
    device = torch.device("cuda", 1)

    def __init__(self):
        self.recorded: list = []

    def record_stream(self, s):
        self.recorded.append(s)


def test_ready_on_current_stream_waits_on_the_crops_device(monkeypatch):
    asked: list = []
    current = FakeStream("cuda:1")

    def current_stream(device=None):
        asked.append(device)
        return current

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    crops, ready = FakeCrops(), FakeEvent()
    assert ready_on_current_stream(crops, ready) is crops
    assert asked == [torch.device("cuda", 1)]
    assert current.waited == [ready] and crops.recorded == [current]
    plain = FakeCrops()
    assert ready_on_current_stream(plain, None) is plain
    assert asked == [torch.device("cuda", 1)] and plain.recorded == []
