"""The CUDA kernels' per-row table (csrc/row_table.h), built and read on the host.

With one grad (or param) per row, the CUDA kernels find each row's memory through a
table of int64 words that the host writes and the device reads. The extension module
runs that same code over CPU tensors through test hooks (`fusedopt._C._row_table`,
`_row_walk`, `_grad_offsets`), so these tests pin its index math down on a machine
without a GPU, against torch's own account of each tensor: its data_ptr and numel, and
where its j-th element (row-major) lies, as torch.as_strided computes it over the
element indices of the tensor's storage.
"""
import math

import pytest
import torch

from fusedopt import _C

ROW_PAD, ROW_WORDS = _C._ROW_PAD, _C._ROW_WORDS
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def grad_layouts(dtype):
    """One grad of every layout the kernels read in place (and padding edge cases)."""
    def randn(*size):
        return torch.randn(*size).to(dtype)

    return {
        "contiguous": randn(5, 7),
        "transposed": randn(7, 5).t(),
        "channels_last": randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        "every_other_column": randn(6, 10)[:, ::2],
        "sliced_with_storage_offset": randn(6, 9)[2:, 3:],
        "leading_columns": randn(6, 7)[:, :6],  # one column short of mergeable
        "strided_1d": randn(30)[::3],
        "size_1_dims_permuted": randn(4, 1, 6, 1).permute(2, 1, 3, 0),
        "size_1_dim_with_an_odd_stride": randn(40).as_strided((3, 1, 4), (8, 999, 2)),
        "mergeable_permute": randn(2, 3, 4).permute(2, 0, 1),
        "expanded": randn(3, 1).expand(3, 4),
        "expanded_scalar": randn(()).expand(5, 3),
        "empty": randn(0, 3),
        "empty_transposed": randn(3, 0).t(),
        "zero_dim": randn(()),
        "one_element": randn(1),
        "exactly_two_pads": randn(2 * ROW_PAD),
        "one_past_a_pad": randn(ROW_PAD + 1),
    }


def storage_indices(t):
    """For each element of t in row-major order, its index in t's storage (torch's own
    index arithmetic: as_strided over the storage's element indices)."""
    elements = t.untyped_storage().nbytes() // t.element_size()
    return torch.arange(elements).as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)


def element_addresses(t):
    """The address of each element of t in row-major order."""
    return t.untyped_storage().data_ptr() + t.element_size() * storage_indices(t)


def segments_for(numels, gap=3):
    """A segment table of rows laid out with `gap` elements between them."""
    rows, offset = [], 0
    for i, numel in enumerate(numels):
        rows.append([offset, numel, i])
        offset += numel + gap
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def per_row_call(grads):
    """One grad and one (contiguous) param per row."""
    params = [torch.empty(g.shape, dtype=g.dtype) for g in grads]
    return params, list(grads), segments_for([g.numel() for g in grads])


def packed_starts(numels):
    """Where each row starts in the packed index space, by the contract: back to back,
    each padded to a multiple of ROW_PAD; then the end of the space."""
    starts = [0]
    for numel in numels:
        starts.append(starts[-1] + -(-numel // ROW_PAD) * ROW_PAD)
    return starts


def decoded_rows(words, n):
    """Per row of the table: (data pointer, numel, shape word index)."""
    return words[n + 1: n + 1 + ROW_WORDS * n].view(n, ROW_WORDS).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_table_holds_each_grads_address_numel_and_elements(dtype):
    grads = list(grad_layouts(dtype).values())
    params, grads, segments = per_row_call(grads)
    words = _C._row_table(params, grads, segments)
    n = len(grads)
    for (address, numel, shape), g in zip(decoded_rows(words, n), grads):
        assert address == g.data_ptr() and numel == g.numel()
        if shape < 0:  # read as contiguous: its elements must lie back to back
            assert torch.equal(storage_indices(g), g.storage_offset() + torch.arange(g.numel()))
            continue
        ndim = int(words[shape])
        sizes = words[shape + 1: shape + 1 + ndim].tolist()
        strides = words[shape + 1 + ndim: shape + 1 + 2 * ndim].tolist()
        assert math.prod(sizes) == g.numel()
        assert 1 not in sizes, "size-1 dims are dropped"
        assert all(strides[d - 1] != strides[d] * sizes[d] for d in range(1, ndim)), "mergeable dims are merged"
        # The merged shape, over the grad's storage, is the grad's elements in order.
        merged = torch.arange(g.untyped_storage().nbytes() // g.element_size()).as_strided(
            sizes, strides, g.storage_offset())
        assert torch.equal(merged.reshape(-1), storage_indices(g))


def test_table_ends_with_each_params_address_when_there_is_one_param_per_row():
    params, grads, segments = per_row_call(list(grad_layouts(torch.float32).values()))
    words = _C._row_table(params, grads, segments)
    assert words[-len(params):].tolist() == [p.data_ptr() for p in params]


def test_packed_starts_are_pad_aligned_and_cover_each_row():
    grads = list(grad_layouts(torch.float32).values())
    params, grads, segments = per_row_call(grads)
    words = _C._row_table(params, grads, segments)
    n = len(grads)
    starts = words[: n + 1].tolist()
    assert starts == packed_starts([g.numel() for g in grads])
    for r, g in enumerate(grads):
        assert starts[r] % ROW_PAD == 0
        assert starts[r] + g.numel() <= starts[r + 1] < starts[r] + g.numel() + ROW_PAD


@pytest.mark.parametrize("dtype", DTYPES)
def test_walk_finds_every_positions_row_and_reads_the_element_torch_has_there(dtype):
    layouts = grad_layouts(dtype)
    # Empty rows first, last and between others: the search must step over them.
    grads = [layouts["empty"]] + list(layouts.values()) + [layouts["empty"], layouts["empty_transposed"]]
    params, grads, segments = per_row_call(grads)
    rows, addresses, param_addresses = _C._row_walk(params, grads, segments)
    starts = packed_starts([g.numel() for g in grads])
    assert len(rows) == len(addresses) == starts[-1]
    for r, g in enumerate(grads):
        begin, end = starts[r], starts[r + 1]
        assert (rows[begin:end] == r).all(), f"row {r}"
        assert torch.equal(addresses[begin: begin + g.numel()], element_addresses(g)), f"row {r}"
        assert (addresses[begin + g.numel(): end] == -1).all(), f"padding of row {r}"
    assert param_addresses.tolist() == [p.data_ptr() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walk_of_a_flat_grad_buffer_reads_each_row_at_its_flat_offset(dtype):
    numels = [5, 0, 40, 1, 0, 33]
    segments = segments_for(numels, gap=7)
    extent = int(segments[-1, 0] + segments[-1, 1]) + 11  # a tail no row covers
    flat_grad = torch.randn(extent).to(dtype)
    flat_param = torch.empty(extent, dtype=dtype)
    rows, addresses, param_addresses = _C._row_walk([flat_param], [flat_grad], segments)
    assert len(rows) == extent
    for position in range(extent):
        # The row containing the position, else (a gap) the next non-empty row.
        ends = [offset + numel for offset, numel, _ in segments.tolist()]
        expected_row = next((r for r, end in enumerate(ends) if end > position), len(numels))
        assert rows[position] == expected_row
        offset, numel, _ = segments[expected_row].tolist() if expected_row < len(numels) else (0, 0, 0)
        inside = offset <= position < offset + numel
        assert addresses[position] == (flat_grad[position].data_ptr() if inside else -1)
    assert param_addresses.tolist() == [flat_param[o].data_ptr() for o in segments[:, 0].tolist()]


def test_a_lone_param_or_grad_of_its_rows_size_is_the_rows_own():
    g = torch.randn(10, 4).t()  # strided: read from its start whatever the flat offset
    param = torch.empty(4, 10)
    segments = torch.tensor([[64, 40, 0]])
    rows, addresses, param_addresses = _C._row_walk([param], [g], segments)
    assert torch.equal(addresses[:40], element_addresses(g))
    assert param_addresses.tolist() == [param.data_ptr()]


def test_a_lone_param_or_grad_of_another_size_is_the_flat_buffer_holding_the_row():
    flat_grad, flat_param = torch.randn(100), torch.empty(100)
    segments = torch.tensor([[64, 10, 0]])
    rows, addresses, param_addresses = _C._row_walk([flat_param], [flat_grad], segments)
    inside = torch.zeros(len(addresses), dtype=torch.bool)
    inside[64:74] = True
    assert torch.equal(addresses[inside], element_addresses(flat_grad[64:74]))
    assert (addresses[~inside] == -1).all()
    assert param_addresses.tolist() == [flat_param[64].data_ptr()]


def test_a_lone_grad_shorter_than_its_row_is_read_no_further_than_its_end():
    g = torch.randn(6)
    rows, addresses, _ = _C._row_walk([torch.empty(20)], [g], torch.tensor([[2, 20, 0]]))
    read = addresses[addresses != -1]
    assert torch.equal(read, element_addresses(g[2:]))


# Shapes too large to allocate, as meta tensors: only their sizes and strides are read.
# Each says whether its indices fit the kernels' 32-bit path (numel < 2**32).
META = torch.device("meta")
HUGE = {
    "2**32-1_transposed": (lambda: torch.empty(65535, 65537, device=META).t(), True),
    "2**32_transposed": (lambda: torch.empty(65536, 65536, device=META).t(), False),
    "every_other_column_5.4e9": (lambda: torch.empty(5, 2**31 + 5, device=META)[:, ::2], False),
    "permuted_3d_2**33": (lambda: torch.empty(1024, 2048, 4096, device=META).permute(2, 0, 1), False),
    "expanded_2**33": (lambda: torch.empty(1, device=META).expand(2**33), False),
    "expanded_column_5x(2**32+1)": (lambda: torch.empty(5, 1, device=META).expand(5, 2**32 + 1), False),
    "channels_last_3e9": (lambda: torch.empty(3, 1000, 1000, 1000, device=META).contiguous(
        memory_format=torch.channels_last), True),
    "small_transposed": (lambda: torch.empty(7, 5, device=META).t(), True),
}


@pytest.mark.parametrize("case", HUGE)
def test_offsets_of_huge_strided_grads_match_torchs_index_arithmetic(case):
    make, narrow = HUGE[case]
    g = make()
    numel = g.numel()
    edges = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, numel - 2, numel - 1]
    sample = torch.randint(0, numel, (2000,), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.tensor([p for p in edges if 0 <= p < numel]), sample])
    offsets, took_narrow = _C._grad_offsets(g, positions)
    assert took_narrow == narrow
    index = torch.unravel_index(positions, g.shape)
    expected = sum(i * stride for i, stride in zip(index, g.stride()))
    assert torch.equal(offsets, expected)


@pytest.mark.parametrize("name", ["transposed", "channels_last", "every_other_column", "size_1_dims_permuted",
                                  "expanded", "mergeable_permute"])
def test_offsets_of_every_element_match_torchs(name):
    g = grad_layouts(torch.float32)[name]
    offsets, took_narrow = _C._grad_offsets(g, torch.arange(g.numel()))
    assert took_narrow
    assert torch.equal(offsets, storage_indices(g) - g.storage_offset())
