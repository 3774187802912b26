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
    assert data.num_classes == 2 and data.junk == 1 and data.unnamed == ["notes.txt"]
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
    assert sorted(name.split(":")[0] for name in data.bad_files) == ["0001_c2s1_000052_00.jpg", "0002_c1s1_000053_00.png"]


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
        assert any(torch.equal(out[b], padded[b, t : t + 8, l : l + 4]) for t in range(5) for l in range(5))
