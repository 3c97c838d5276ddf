#!/usr/bin/env python3
"""make_data_fixtures.py: expected values for test_data.cu.

A Python/numpy re-implementation of Megatron-LM's data pipeline as of 2022
(megatron/data/dataset_utils.py get_train_valid_test_split_ and
get_datasets_weights_and_num_samples, gpt_dataset.py _build_index_mappings and
GPTDataset.__getitem__, helpers.cpp build_sample_idx and build_blending_indices,
blendable_dataset.py BlendableDataset), drawing from numpy.random.RandomState as
Megatron does. It writes test/fixtures/data_gpt.txt: one array per line,
"name count v1 v2 ...".

  python3 test/make_data_fixtures.py [DATA_DIR]    (DATA_DIR default ../shared/data)

The synthetic datasets are a list of sequence sizes; token j of sequence i is
synthetic_token(i, j), which test_data.cu computes the same way. The real-data case
is one Gutenberg book, split into paragraphs at blank lines, bytes as tokens, 256
as the end-of-document token. Needs numpy only. CI does not run this; the fixture
it makes is committed.
"""
import math
import os
import sys

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "data_gpt.txt")
lines = []


def emit(name, values):
    values = [str(v) for v in np.asarray(values).reshape(-1).tolist()] if not isinstance(values, str) else [values]
    lines.append("%s %d %s" % (name, len(values), " ".join(values)))


def fnv(values):
    """FNV-1a over 64-bit values (not bytes): a short digest of a long array."""
    h = 14695981039346656037
    for v in np.asarray(values).reshape(-1).tolist():
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


# ---- numpy's legacy shuffle, checked against numpy itself ----------------------------------

def random_interval(next32, mx):
    """numpy's legacy random_interval(max): masked rejection, 64-bit draws above 2^32-1."""
    if mx == 0:
        return 0
    mask = mx
    for shift in (1, 2, 4, 8, 16, 32):
        mask |= mask >> shift
    while True:
        v = next32() if mx <= 0xFFFFFFFF else (next32() << 32) | next32()
        v &= mask
        if v <= mx:
            return v


def check_shuffle_description():
    for seed, n in ((1234, 1000), (7, 70000), (0, 2), (42, 1)):
        x = np.arange(n, dtype=np.int32)
        np.random.RandomState(seed).shuffle(x)
        bitgen = np.random.RandomState(seed)._bit_generator
        y = list(range(n))
        for i in range(n - 1, 0, -1):
            j = random_interval(lambda: int(bitgen.random_raw()), i)
            y[i], y[j] = y[j], y[i]
        assert x.tolist() == y, "numpy's shuffle is not the masked-rejection Fisher-Yates described"
    big = 2**40 + 12344
    got = np.random.RandomState(5).randint(0, big + 1, size=6, dtype=np.int64).tolist()
    bitgen = np.random.RandomState(5)._bit_generator
    want = [random_interval(lambda: int(bitgen.random_raw()), big) for _ in range(6)]
    assert got == want, "64-bit bounded draws differ"
    emit("mt_raw_seed1234", np.random.RandomState(1234)._bit_generator.random_raw(8))
    emit("interval64_max", [big])
    emit("interval64_seed5", got)
    x = np.arange(20, dtype=np.uint32)
    np.random.RandomState(99).shuffle(x)
    emit("shuffle20_seed99", x)


# ---- Megatron (2022), re-implemented -----------------------------------------------------

def get_train_valid_test_split_(splits_string, size):
    if splits_string.find(",") != -1:
        splits = [float(s) for s in splits_string.split(",")]
    elif splits_string.find("/") != -1:
        splits = [float(s) for s in splits_string.split("/")]
    else:
        splits = [float(splits_string)]
    while len(splits) < 3:
        splits.append(0.0)
    splits = splits[:3]
    splits_sum = sum(splits)
    assert splits_sum > 0.0
    splits = [split / splits_sum for split in splits]
    splits_index = [0]
    for index, split in enumerate(splits):
        splits_index.append(splits_index[index] + int(round(split * float(size))))
    diff = splits_index[-1] - size
    for index in range(1, len(splits_index)):
        splits_index[index] -= diff
    assert len(splits_index) == 4
    assert splits_index[-1] == size
    return splits_index


def _num_epochs(tokens_per_epoch, seq_length, num_samples):
    num_epochs = 0
    total_tokens = 0
    while True:
        num_epochs += 1
        total_tokens += tokens_per_epoch
        if ((total_tokens - 1) // seq_length) >= num_samples:
            return num_epochs


def _build_doc_idx(documents, num_epochs, np_rng, separate_last_epoch):
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.mgrid[0:num_epochs, 0:len(documents)][1]
        doc_idx[:] = documents
        doc_idx = doc_idx.reshape(-1)
        doc_idx = doc_idx.astype(np.int32)
        np_rng.shuffle(doc_idx)
        return doc_idx
    doc_idx_first = _build_doc_idx(documents, num_epochs - 1, np_rng, False)
    doc_idx_last = _build_doc_idx(documents, 1, np_rng, False)
    return np.concatenate((doc_idx_first, doc_idx_last))


def build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """helpers.cpp build_sample_idx."""
    assert seq_length > 1 and num_epochs > 0 and tokens_per_epoch > 1
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int32)
    doc_idx_index = 0
    doc_offset = 0
    for sample_index in range(1, num_samples + 1):
        remaining_seq_length = seq_length + 1
        while remaining_seq_length != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining_seq_length -= doc_length
            if remaining_seq_length <= 0:
                doc_offset += remaining_seq_length + doc_length - 1
                remaining_seq_length = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
    return sample_idx


def _build_shuffle_idx(num_samples, total_size, np_rng):
    dtype_ = np.uint32
    if total_size >= (np.iinfo(np.uint32).max - 1):
        dtype_ = np.int64
    shuffle_idx_first = np.arange(start=0, stop=num_samples, step=1, dtype=dtype_)
    np_rng.shuffle(shuffle_idx_first)
    if num_samples == total_size:
        return shuffle_idx_first
    shuffle_idx_last = np.arange(start=num_samples, stop=total_size, step=1, dtype=dtype_)
    np_rng.shuffle(shuffle_idx_last)
    return np.concatenate((shuffle_idx_first, shuffle_idx_last))


class GPTDataset:
    def __init__(self, documents, indexed_dataset, num_samples, seq_length, seed):
        self.indexed_dataset = indexed_dataset
        sizes = indexed_dataset.sizes
        assert np.min(documents) >= 0 and np.max(documents) < sizes.shape[0]
        tokens_per_epoch = int(np.sum(sizes[documents]))
        num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
        np_rng = np.random.RandomState(seed=seed)
        if num_epochs == 1:
            separate_last_epoch = False
        else:
            num_samples_from_epochs_minus_one = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
            last_epoch_num_samples = num_samples - num_samples_from_epochs_minus_one
            assert last_epoch_num_samples >= 0
            num_samples_per_epoch = (tokens_per_epoch - 1) // seq_length
            # 2022 asserted `<` here, which the floors can break by one on small epochs; later
            # Megatron relaxed it to `<=` and so do we (nothing else depends on it)
            assert last_epoch_num_samples <= (num_samples_per_epoch + 1)
            separate_last_epoch = last_epoch_num_samples < int(0.80 * num_samples_per_epoch)
        self.doc_idx = _build_doc_idx(documents, num_epochs, np_rng, separate_last_epoch)
        self.sample_idx = build_sample_idx(sizes, self.doc_idx, seq_length, num_epochs, tokens_per_epoch)
        if separate_last_epoch:
            num_samples_ = num_samples_from_epochs_minus_one
        else:
            num_samples_ = self.sample_idx.shape[0] - 1
        self.shuffle_idx = _build_shuffle_idx(num_samples_, self.sample_idx.shape[0] - 1, np_rng)
        self.num_epochs = num_epochs
        self.separate_last_epoch = separate_last_epoch

    def __len__(self):
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx):
        idx = self.shuffle_idx[idx]
        doc_index_f = self.sample_idx[idx][0]
        doc_index_l = self.sample_idx[idx + 1][0]
        offset_f = self.sample_idx[idx][1]
        offset_l = self.sample_idx[idx + 1][1]
        if doc_index_f == doc_index_l:
            sample = self.indexed_dataset.get(self.doc_idx[doc_index_f], offset=offset_f, length=offset_l - offset_f + 1)
        else:
            sample_list = [self.indexed_dataset.get(self.doc_idx[doc_index_f], offset=offset_f)]
            for i in range(doc_index_f + 1, doc_index_l):
                sample_list.append(self.indexed_dataset.get(self.doc_idx[i]))
            sample_list.append(self.indexed_dataset.get(self.doc_idx[doc_index_l], length=offset_l + 1))
            sample = np.concatenate(sample_list)
        return np.array(sample, dtype=np.int64)


def build_blending_indices(weights, num_datasets, size):
    """helpers.cpp build_blending_indices."""
    dataset_index = np.zeros(size, dtype=np.uint8)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    current_samples = [0] * num_datasets
    for sample_idx in range(size):
        sample_idx_double = max(float(sample_idx), 1.0)
        max_error_index = 0
        max_error = weights[0] * sample_idx_double - float(current_samples[0])
        for dataset_idx in range(1, num_datasets):
            error = weights[dataset_idx] * sample_idx_double - float(current_samples[dataset_idx])
            if error > max_error:
                max_error = error
                max_error_index = dataset_idx
        dataset_index[sample_idx] = max_error_index
        dataset_sample_index[sample_idx] = current_samples[max_error_index]
        current_samples[max_error_index] += 1
    return dataset_index, dataset_sample_index


class BlendableDataset:
    def __init__(self, datasets, weights):
        self.datasets = datasets
        num_datasets = len(datasets)
        assert num_datasets == len(weights)
        self.size = 0
        for dataset in self.datasets:
            self.size += len(dataset)
        weights = np.array(weights, dtype=np.float64)
        sum_weights = np.sum(weights)
        assert sum_weights > 0.0
        weights /= sum_weights
        assert num_datasets < 255
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, num_datasets, self.size)

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        return self.datasets[self.dataset_index[idx]][self.dataset_sample_index[idx]]


def get_datasets_weights_and_num_samples(data_prefix, train_valid_test_num_samples):
    assert len(data_prefix) % 2 == 0
    num_datasets = len(data_prefix) // 2
    weights = [0] * num_datasets
    prefixes = [0] * num_datasets
    for i in range(num_datasets):
        weights[i] = float(data_prefix[2 * i])
        prefixes[i] = (data_prefix[2 * i + 1]).strip()
    weight_sum = 0.0
    for weight in weights:
        weight_sum += weight
    assert weight_sum > 0.0
    weights = [weight / weight_sum for weight in weights]
    datasets_train_valid_test_num_samples = []
    for weight in weights:
        datasets_train_valid_test_num_samples.append(
            [int(math.ceil(val * weight * 1.005)) for val in train_valid_test_num_samples])
    return prefixes, weights, datasets_train_valid_test_num_samples


def _build_train_valid_test_datasets(indexed_dataset, splits_string, train_valid_test_num_samples, seq_length, seed):
    total_num_of_documents = indexed_dataset.sizes.shape[0]
    splits = get_train_valid_test_split_(splits_string, total_num_of_documents)
    out = []
    for index in range(3):
        dataset = None
        if splits[index + 1] > splits[index]:
            documents = np.arange(start=splits[index], stop=splits[index + 1], step=1, dtype=np.int32)
            dataset = GPTDataset(documents, indexed_dataset, train_valid_test_num_samples[index], seq_length, seed)
        out.append(dataset)
    return out


def build_train_valid_test_datasets(data_prefix, datasets_by_name, splits_string, nums, seq_length, seed):
    """gpt_dataset.build_train_valid_test_datasets, prefixes looked up in datasets_by_name."""
    if len(data_prefix) == 1:
        return _build_train_valid_test_datasets(datasets_by_name[data_prefix[0]], splits_string, nums, seq_length, seed)
    prefixes, weights, per_dataset_nums = get_datasets_weights_and_num_samples(data_prefix, nums)
    splits = [[], [], []]
    for i in range(len(prefixes)):
        for k, ds in enumerate(_build_train_valid_test_datasets(datasets_by_name[prefixes[i]], splits_string,
                                                                per_dataset_nums[i], seq_length, seed)):
            if ds:
                splits[k].append(ds)
    return [BlendableDataset(s, weights) if s else None for s in splits]


# ---- datasets the C test rebuilds --------------------------------------------------------

def synthetic_token(seq, j):
    return (seq * 7919 + j * 31) % 50000


class SyntheticDataset:
    def __init__(self, sizes):
        self.sizes = np.asarray(sizes, dtype=np.int32)

    def get(self, idx, offset=0, length=None):
        if length is None:
            length = int(self.sizes[idx]) - offset
        return np.array([synthetic_token(int(idx), offset + j) for j in range(length)], dtype=np.int64)


class TokenListDataset:
    def __init__(self, docs):
        self.docs = docs
        self.sizes = np.array([len(d) for d in docs], dtype=np.int32)

    def get(self, idx, offset=0, length=None):
        if length is None:
            length = int(self.sizes[idx]) - offset
        return np.asarray(self.docs[idx][offset:offset + length], dtype=np.int64)


def emit_samples(name, ds, indices):
    emit(name + ".sample_ids", indices)
    emit(name + ".samples", np.concatenate([ds[i] for i in indices]))


def emit_gpt(name, ds, full_arrays=True):
    emit(name + ".len", [len(ds)])
    emit(name + ".num_epochs", [ds.num_epochs])
    emit(name + ".separate", [int(ds.separate_last_epoch)])
    if full_arrays:
        emit(name + ".doc_idx", ds.doc_idx)
        emit(name + ".sample_idx", ds.sample_idx)
        emit(name + ".shuffle_idx", ds.shuffle_idx)
    else:
        emit(name + ".doc_idx_fnv", [fnv(ds.doc_idx)])
        emit(name + ".sample_idx_fnv", [fnv(ds.sample_idx)])
        emit(name + ".shuffle_idx_fnv", [fnv(ds.shuffle_idx)])
    n = len(ds)
    emit_samples(name, ds, sorted(set([0, 1, 2, n // 2, n - 1])))


def split_cases():
    cases = [("949,50,1", 1000), ("949,50,1", 12345), ("969,30,1", 7), ("1/2", 7), ("1", 5), ("0.5,0.5", 3),
             ("2,0,1", 10), ("1,1,1", 2), ("98,2", 101), ("1,2,3,4", 7), ("1,1,1", 0), ("3,3,3", 5)]
    for i, (s, size) in enumerate(cases):
        emit("split%d.string" % i, s)
        emit("split%d.size" % i, [size])
        emit("split%d.idx" % i, get_train_valid_test_split_(s, size))


def synthetic_cases():
    sizes_a = np.random.RandomState(7).randint(1, 60, size=40).astype(np.int32)
    sizes_b = np.random.RandomState(8).randint(0, 10, size=30).astype(np.int32)
    sizes_b[0] = 0
    sizes_b[5] = 0
    emit("A.sizes", sizes_a)
    emit("B.sizes", sizes_b)
    datasets = {"A": SyntheticDataset(sizes_a), "B": SyntheticDataset(sizes_b)}

    # A alone: train one epoch, valid 3 epochs with a separate last epoch, test 3 epochs shuffled together
    split, s = "80,15,5", 16
    bounds = get_train_valid_test_split_(split, len(sizes_a))
    tpe = [int(np.sum(sizes_a[bounds[k]:bounds[k + 1]])) for k in range(3)]
    per_epoch = [(t - 1) // s for t in tpe]
    before_last = [(2 * t - 1) // s for t in tpe]
    nums = [per_epoch[0] // 2, before_last[1] + 1, before_last[2] + int(0.8 * per_epoch[2])]
    case(datasets, "gptA", ["A"], split, nums, s, 1234, expect=[(1, 0), (3, 1), (3, 0)])

    # B: documents shorter than a sample, some empty, many epochs
    case(datasets, "gptB", ["B"], "1,1,1", [50, 7, 12], 32, 42)

    case(datasets, "blend2", ["0.3", "A", "0.7", "B"], "80,15,5", [200, 30, 20], 8, 1234)
    case(datasets, "blend3", ["0", "A", "1", "B", "2", "A"], "80,15,5", [100, 10, 10], 8, 5)
    case(datasets, "blend1", ["1.0", "A"], "80,15,5", [50, 5, 5], 16, 1234)
    # weights whose blend changes when weight*x - taken is fused into one FMA
    case(datasets, "blend4", ["1", "A", "2", "B", "3", "A"], "80,15,5", [100, 10, 10], 8, 1234)


def case(datasets, name, data_path, split, nums, seq_length, seed, expect=None):
    emit(name + ".data_path", ",".join(data_path))
    emit(name + ".split", split)
    emit(name + ".num_samples", nums)
    emit(name + ".seq_length", [seq_length])
    emit(name + ".seed", [seed])
    sets = build_train_valid_test_datasets(data_path, datasets, split, nums, seq_length, seed)
    for k, ds in enumerate(sets):
        sub = "%s.%d" % (name, k)
        if isinstance(ds, BlendableDataset):
            emit(sub + ".len", [len(ds)])
            emit(sub + ".component_lens", [len(d) for d in ds.datasets])
            emit(sub + ".dataset_index", ds.dataset_index)
            emit(sub + ".dataset_sample_index", ds.dataset_sample_index)
            emit_samples(sub, ds, sorted(set([0, 1, 2, nums[k] // 2, nums[k] - 1])))
        else:
            if expect:
                assert (ds.num_epochs, int(ds.separate_last_epoch)) == expect[k], (name, k, ds.num_epochs)
            emit_gpt(sub, ds)


def gutenberg_case(data_dir):
    path = os.path.join(data_dir, "corpus", "gutenberg", "austen-emma.txt")
    text = open(path, "rb").read()
    docs = [list(p) + [256] for p in text.split(b"\n\n") if p]
    ds = TokenListDataset(docs)
    emit("gutenberg.num_docs", [len(docs)])
    emit("gutenberg.num_tokens", [int(np.sum(ds.sizes))])
    split, s, nums = "949,50,1", 128, [40000, 700, 100]
    emit("gutenberg.split", split)
    emit("gutenberg.num_samples", nums)
    emit("gutenberg.seq_length", [s])
    sets = _build_train_valid_test_datasets(ds, split, nums, s, 1234)
    for k, g in enumerate(sets):
        emit_gpt("gutenberg.%d" % k, g, full_arrays=False)


if __name__ == "__main__":
    data_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(OUT), "..", "..", "..", "shared", "data")
    check_shuffle_description()
    split_cases()
    synthetic_cases()
    gutenberg_case(data_dir)
    with open(OUT, "w") as f:
        f.write("# made by test/make_data_fixtures.py (numpy %s): name count values...\n" % np.__version__)
        f.write("\n".join(lines) + "\n")
    print("wrote %s (%d arrays)" % (OUT, len(lines)))
