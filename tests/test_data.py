import numpy as np
import pytest
import torch

from tests.conftest import person_image, write_market
from training.data import MarketDataset, PKSampler, RandomBatchSampler, TrainAugmentation, read_split


def test_reader_parses_names_and_keeps_junk_out_of_training(tmp_path):
    root = write_market(tmp_path, train_pids=[0, 5], test_pids=[1000])
    person_image(9, 1).save(root / "bounding_box_train" / "-1_c1s1_000099_00.jpg")
    (root / "bounding_box_train" / "notes.txt").write_text("not an image, not named like one")
    data = MarketDataset(root, 64, 32, progress=False)
    assert data.num_classes == 2 and data.junk == 1 and data.unnamed == [f"{root.name}/notes.txt"]
    assert sorted(set(data.labels.tolist())) == [0, 1]
    assert data.images.shape == (12, 64, 32, 3) and data.images.dtype == np.uint8
    query, _ = read_split(root / "query")
    assert [(r.pid, r.camid) for r in query] == [(1000, 1)]


def test_formats_are_judged_by_content_and_corrupt_files_reported_by_name(tmp_path):
    root = write_market(tmp_path, train_pids=[1, 2], test_pids=[1000])
    train = root / "bounding_box_train"
    person_image(1, 50).save(train / "0001_c1s1_000050_00.jpg", format="PNG")  # PNG bytes, .jpg name
    person_image(2, 51).save(train / "0002_c2s1_000051_00.bmp", format="WEBP")
    (train / "0001_c2s1_000052_00.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (train / "0002_c1s1_000053_00.png").write_bytes(b"")
    data = MarketDataset(root, 64, 32, progress=False)
    assert len(data) == 14
    assert sorted(name.split(":")[0] for name in data.bad_files) == [
        "0001_c2s1_000052_00.jpg",
        "0002_c1s1_000053_00.png",
    ]


def test_uncached_dataset_decodes_on_demand(tmp_path):
    root = write_market(tmp_path, train_pids=[1], test_pids=[1000])
    cached = MarketDataset(root, 64, 32, cache_images=True, progress=False)
    lazy = MarketDataset(root, 64, 32, cache_images=False, progress=False)
    assert np.array_equal(cached.image(3), lazy.image(3))


def test_pk_sampler_draws_p_identities_times_k_images():
    labels = [0] * 5 + [1] * 2 + [2] * 6 + [3] * 3
    sampler = PKSampler(labels, batch_size=6, num_instances=3, generator=torch.Generator().manual_seed(0))
    for batch in sampler:
        drawn = [labels[i] for i in batch]
        assert len(batch) == 6 and len(set(drawn)) == 2
        assert all(drawn.count(label) == 3 for label in set(drawn))
    with pytest.raises(ValueError):
        PKSampler(labels, batch_size=10, num_instances=3, generator=torch.Generator())


def test_random_sampler_covers_every_item_once_per_epoch():
    sampler = RandomBatchSampler(10, 3, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == 3 and len({i for b in batches for i in b}) == 9


def test_augmentation_flips_pads_and_crops_to_the_input_size():
    images = torch.arange(2 * 8 * 4 * 3, dtype=torch.uint8).view(2, 8, 4, 3)
    flip_only = TrainAugmentation(flip_prob=1.0, padding=0)(images, torch.Generator())
    assert torch.equal(flip_only, images.flip(2))
    out = TrainAugmentation(flip_prob=0.0, padding=2)(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    # every output is a shifted window of the zero-padded input
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (2, 2, 2, 2)).permute(0, 2, 3, 1)
    for b in range(2):
        assert any(torch.equal(out[b], padded[b, t : t + 8, x : x + 4]) for t in range(5) for x in range(5))


def test_random_sized_crop_boxes_keep_to_their_area_and_aspect_inside_the_image():
    augment = TrainAugmentation(crop_area=(0.64, 1.0), crop_aspect=(1 / 3, 1 / 2))
    top, left, box_h, box_w = augment.crop_boxes(4000, 384, 128, torch.Generator().manual_seed(0)).unbind(1)
    area, aspect = box_h * box_w / (384 * 128), box_w / box_h
    assert area.min() >= 0.64 - 1e-4 and area.max() <= 1.0 + 1e-4 and area.max() > 0.95
    assert aspect.min() >= 1 / 3 - 1e-4 and aspect.max() <= 1 / 2 + 1e-4
    assert (
        top.min() >= 0 and (top + box_h).max() <= 384 + 1e-4 and left.min() >= 0 and (left + box_w).max() <= 128 + 1e-4
    )


def test_random_sized_crop_resizes_the_box_back_to_the_input_size():
    from training.data.transforms import resized_crop

    rows = torch.arange(64, dtype=torch.float32).view(1, 64, 1, 1).expand(1, 64, 32, 3)  # pixel value = its row
    whole = resized_crop(rows.to(torch.uint8), torch.tensor([[0.0, 0.0, 64.0, 32.0]]))
    assert torch.equal(whole, rows.to(torch.uint8))  # the whole image as the box: unchanged
    half = resized_crop((rows * 2).to(torch.uint8), torch.tensor([[16.0, 8.0, 32.0, 16.0]]))
    # rows 16..47 stretched over 64 output rows: row r of the output shows input row 16 + (r + 0.5) / 2 - 0.5
    expected = (2 * (16 + (torch.arange(64) + 0.5) / 2 - 0.5)).clamp(min=32).round()
    assert half.shape == (1, 64, 32, 3) and torch.allclose(half[0, :, 10, 0].float(), expected, atol=1)
    out = TrainAugmentation(flip_prob=0, crop_area=(0.64, 1.0))(
        rows.to(torch.uint8).repeat(8, 1, 1, 1), torch.Generator().manual_seed(0)
    )
    assert out.shape == (8, 64, 32, 3) and out.dtype == torch.uint8 and not torch.equal(out[0], out[1])


def write_source_mapping(root, subset_of_pid):
    rows = ["split,file,pid,cam,source_subset"]
    for path in sorted((root / "bounding_box_train").iterdir()):
        pid = int(path.name[:4])
        rows.append(f"bounding_box_train,{path.name},{pid},1,{subset_of_pid[pid]}")
    (root / "mapping.csv").write_text("\n".join(rows) + "\n")


def test_several_roots_get_their_own_ids_cameras_and_sources(tmp_path):
    first = write_market(tmp_path / "first", train_pids=[0, 1], test_pids=[1000])
    second = write_market(tmp_path / "second", train_pids=[0, 7], test_pids=[1000])
    write_source_mapping(second, {0: "Mall", 7: "Street"})
    data = MarketDataset([first, second], 64, 32, progress=False)
    # pid 0 of each folder is a different person; cameras 1-2 of the second folder become 3-4
    assert data.num_classes == 4
    assert sorted({(r.source, r.camid) for r in data.records}) == [
        ("first", 1),
        ("first", 2),
        ("second/Mall", 3),
        ("second/Mall", 4),
        ("second/Street", 3),
        ("second/Street", 4),
    ]
    assert data.describe_sources() == {
        name: {"images": 6 * n, "identities": n} for name, n in (("first", 2), ("second/Mall", 1), ("second/Street", 1))
    }
    assert data.source_weights({"Street": 0.25, "first": 2}).tolist() == [2.0, 1.0, 0.25]
    assert data.source_weights({"TownCentre": 0.5}).tolist() == [
        1.0,
        1.0,
        1.0,
    ]  # pool.yaml's weight on other data: skipped


def test_pk_sampler_draws_identities_in_proportion_to_their_weight():
    labels = [label for label in range(6) for _ in range(4)]
    weights = [1, 1, 1, 1, 4, 0]
    sampler = PKSampler(
        labels, batch_size=4, num_instances=2, generator=torch.Generator().manual_seed(0), identity_weights=weights
    )
    counts = np.zeros(6)
    for _ in range(200):
        for batch in sampler:
            counts[sorted({labels[i] for i in batch})] += 1
    assert counts[5] == 0
    # identity 4 is in nearly every batch (drawn first 4 times in 8, else often second), the rest share the remainder
    assert counts[4] > 2 * counts[:4].mean()
    assert np.ptp(counts[:4]) < 0.25 * counts[:4].mean()


def test_weighted_random_sampler_follows_the_weights():
    sampler = RandomBatchSampler(400, 50, torch.Generator().manual_seed(0), weights=[0, 1, 1, 2] * 100)
    drawn = np.bincount([i % 4 for batch in sampler for i in batch], minlength=4)
    assert drawn[0] == 0 and abs(drawn[3] / drawn[1] - 2) < 0.5


def test_photometric_augmentations_keep_shape_and_change_what_they_should():
    images = torch.from_numpy(np.stack([np.asarray(person_image(p, 1, (32, 64))) for p in range(8)]))
    gray = TrainAugmentation(flip_prob=0, padding=0, grayscale_prob=1.0)(images, torch.Generator().manual_seed(0))
    assert gray.dtype == torch.uint8 and gray.shape == images.shape
    assert (gray.int().diff(dim=3).abs() <= 1).all()  # R = G = B up to rounding
    jitter = TrainAugmentation(flip_prob=0, padding=0, color_jitter=0.4, color_jitter_prob=1.0)
    assert not torch.equal(jitter(images, torch.Generator().manual_seed(0)), images)
    erased = TrainAugmentation(flip_prob=0, padding=0, erasing_prob=1.0)(images, torch.Generator().manual_seed(0))
    changed = (erased != images).any(dim=3).float().mean(dim=(1, 2))
    assert ((changed > 0.01) & (changed < 0.45)).all()  # one rectangle of 2-40% of the image per image
    again = TrainAugmentation(flip_prob=0, padding=0, erasing_prob=1.0)(images, torch.Generator().manual_seed(0))
    assert torch.equal(erased, again)


def test_batches_are_the_same_inline_and_in_worker_processes(tmp_path):
    from training.data import batch_loader

    root = write_market(tmp_path, train_pids=range(4), test_pids=[1000])
    data = MarketDataset(root, 32, 16, progress=False)
    augment = TrainAugmentation(padding=2, color_jitter=0.3, erasing_prob=0.5)

    def epoch(workers):
        sampler = PKSampler(data.labels, 8, 2, torch.Generator().manual_seed(3))
        return list(batch_loader(data, augment, sampler, torch.Generator().manual_seed(4), 3, workers))

    for (inline_images, inline_labels), (worker_images, worker_labels) in zip(epoch(0), epoch(1)):
        assert torch.equal(inline_images, worker_images) and torch.equal(inline_labels, worker_labels)
