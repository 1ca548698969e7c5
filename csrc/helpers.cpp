// Fast index builders for the GPT/blended datasets (pybind11 extension megatron_cola.data._helpers).
//
// build_sample_idx      : [num_samples + 1, 2] table of (position in the document index, token offset)
//                         marking where each seq_length(+1)-token sample starts, Megatron-LM semantics.
// build_blending_indices: deterministic greedy interleaving of several datasets following weights:
//                         sample i goes to the dataset whose count lags weight * max(i, 1) the most.
//
// megatron_cola/data/helpers.py holds a numpy reference implementation with identical output and is the
// public entry point; tests check that both agree.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// The blending comparison must round exactly like the Python fallback: no fused multiply-add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace py = pybind11;

namespace {

using InArrayI32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using InArrayF64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> build_sample_idx_typed(const InArrayI32 &sizes, const InArrayI32 &document_index,
                                      int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                                      bool drop_last_partial_sequence, int64_t add_extra_token) {
  if (sizes.ndim() != 1 || document_index.ndim() != 1) {
    throw std::invalid_argument("build_sample_idx: sizes and document_index must be 1-D");
  }
  if (seq_length < 1) throw std::invalid_argument("build_sample_idx: seq_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("build_sample_idx: num_epochs must be >= 1");
  if (tokens_per_epoch < 1) throw std::invalid_argument("build_sample_idx: tokens_per_epoch must be >= 1");
  if (add_extra_token != 0 && add_extra_token != 1) {
    throw std::invalid_argument("build_sample_idx: add_extra_token_to_sequence must be 0 or 1");
  }
  const int64_t n_docs = document_index.shape(0);
  const int64_t n_sizes = sizes.shape(0);
  if (n_docs == 0) throw std::invalid_argument("build_sample_idx: empty document_index");
  if (n_docs - 1 > static_cast<int64_t>(std::numeric_limits<T>::max())) {
    throw std::overflow_error("build_sample_idx: document_index too long for the output dtype");
  }

  const int64_t usable = num_epochs * tokens_per_epoch - add_extra_token;
  int64_t num_samples = 0;
  if (usable > 0) {
    num_samples = drop_last_partial_sequence ? usable / seq_length : (usable + seq_length - 1) / seq_length;
  }

  const int32_t *sz = sizes.data();
  const int32_t *docs = document_index.data();
  std::vector<T> out(static_cast<size_t>(2 * (num_samples + 1)));
  std::string error;
  {
    py::gil_scoped_release release;
    int64_t pos = 0;     // position in document_index
    int64_t offset = 0;  // token offset inside document docs[pos]
    out[0] = 0;
    out[1] = 0;
    for (int64_t s = 1; s <= num_samples && error.empty(); ++s) {
      // Tokens still to consume for this sample, counting the one it shares with the next sample.
      int64_t need = seq_length + add_extra_token;
      while (true) {
        const int32_t doc = docs[pos];
        if (doc < 0 || doc >= n_sizes) {
          error = "build_sample_idx: document id " + std::to_string(doc) + " out of range for " +
                  std::to_string(n_sizes) + " sizes";
          break;
        }
        const int64_t available = static_cast<int64_t>(sz[doc]) - offset;
        if (available >= need) {
          offset += need - add_extra_token;
          break;
        }
        need -= available;
        if (pos + 1 == n_docs) {
          // Out of documents: only legal for the final, partial sample.
          if (s != num_samples) {
            error = "build_sample_idx: document_index holds fewer tokens than num_epochs * tokens_per_epoch";
          }
          offset = static_cast<int64_t>(sz[doc]) - add_extra_token;
          break;
        }
        ++pos;
        offset = 0;
      }
      out[2 * s] = static_cast<T>(pos);
      out[2 * s + 1] = static_cast<T>(offset);
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);

  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  std::copy(out.begin(), out.end(), result.mutable_data());
  return result;
}

py::array build_sample_idx(const InArrayI32 &sizes, const InArrayI32 &document_index, int64_t seq_length,
                           int64_t num_epochs, int64_t tokens_per_epoch, bool drop_last_partial_sequence,
                           int64_t add_extra_token) {
  // int32 output unless a document position or a document size does not fit (same rule as helpers.py).
  int64_t largest = document_index.shape(0);
  const int32_t *sz = sizes.data();
  for (int64_t i = 0; i < sizes.shape(0); ++i) largest = std::max<int64_t>(largest, sz[i]);
  if (largest <= std::numeric_limits<int32_t>::max()) {
    return build_sample_idx_typed<int32_t>(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                           drop_last_partial_sequence, add_extra_token);
  }
  return build_sample_idx_typed<int64_t>(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                         drop_last_partial_sequence, add_extra_token);
}

template <typename IndexT>
void blend(IndexT *dataset_index, int64_t *dataset_sample_index, const double *weights, int32_t num_datasets,
           int64_t size) {
  std::vector<int64_t> taken(static_cast<size_t>(num_datasets), 0);
  for (int64_t i = 0; i < size; ++i) {
    const double target = std::max(static_cast<double>(i), 1.0);
    int32_t best = 0;
    double best_lag = weights[0] * target - static_cast<double>(taken[0]);
    for (int32_t d = 1; d < num_datasets; ++d) {
      const double lag = weights[d] * target - static_cast<double>(taken[d]);
      if (lag > best_lag) {  // strict: ties go to the lower dataset id
        best_lag = lag;
        best = d;
      }
    }
    dataset_index[i] = static_cast<IndexT>(best);
    dataset_sample_index[i] = taken[best];
    taken[best] += 1;
  }
}

void check_output(const py::array &arr, const char *name, int64_t size) {
  if (arr.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be 1-D");
  if (!(arr.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be contiguous");
  if (!arr.writeable()) throw std::invalid_argument(std::string(name) + " must be writeable");
  if (arr.shape(0) < size) {
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(arr.shape(0)) +
                                " entries, fewer than size=" + std::to_string(size));
  }
}

void build_blending_indices(py::array dataset_index, py::array dataset_sample_index, const InArrayF64 &weights,
                            int32_t num_datasets, int64_t size, bool verbose) {
  if (num_datasets < 1) throw std::invalid_argument("build_blending_indices: num_datasets must be >= 1");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  if (weights.ndim() != 1 || weights.shape(0) != num_datasets) {
    throw std::invalid_argument("build_blending_indices: weights must be 1-D with num_datasets entries");
  }
  check_output(dataset_index, "dataset_index", size);
  check_output(dataset_sample_index, "dataset_sample_index", size);
  if (!dataset_sample_index.dtype().is(py::dtype::of<int64_t>())) {
    throw std::invalid_argument("build_blending_indices: dataset_sample_index must be int64");
  }
  const double *w = weights.data();
  auto *samples = static_cast<int64_t *>(dataset_sample_index.mutable_data());
  if (dataset_index.dtype().is(py::dtype::of<uint8_t>())) {
    if (num_datasets > 256) throw std::invalid_argument("build_blending_indices: uint8 holds at most 256 datasets");
    auto *idx = static_cast<uint8_t *>(dataset_index.mutable_data());
    py::gil_scoped_release release;
    blend(idx, samples, w, num_datasets, size);
  } else if (dataset_index.dtype().is(py::dtype::of<int16_t>())) {
    if (num_datasets > 32768) throw std::invalid_argument("build_blending_indices: int16 holds at most 32768 datasets");
    auto *idx = static_cast<int16_t *>(dataset_index.mutable_data());
    py::gil_scoped_release release;
    blend(idx, samples, w, num_datasets, size);
  } else {
    throw std::invalid_argument("build_blending_indices: dataset_index must be uint8 or int16");
  }
  if (verbose) {
    std::vector<int64_t> counts(static_cast<size_t>(num_datasets), 0);
    const auto *idx = static_cast<const uint8_t *>(dataset_index.data());
    const bool is_u8 = dataset_index.dtype().is(py::dtype::of<uint8_t>());
    const auto *idx16 = static_cast<const int16_t *>(dataset_index.data());
    for (int64_t i = 0; i < size; ++i) counts[is_u8 ? idx[i] : idx16[i]] += 1;
    std::cout << " > blending " << size << " samples:" << std::endl;
    for (int32_t d = 0; d < num_datasets; ++d) {
      std::cout << "   dataset " << d << ", weight " << w[d] << ", achieved "
                << (size ? static_cast<double>(counts[d]) / static_cast<double>(size) : 0.0) << std::endl;
    }
  }
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ sample-index and blending-index builders (see megatron_cola/data/helpers.py)";
  const auto sample_args = std::make_tuple(py::arg("sizes"), py::arg("document_index"), py::arg("seq_length"),
                                           py::arg("num_epochs"), py::arg("tokens_per_epoch"),
                                           py::arg("drop_last_partial_sequence") = true,
                                           py::arg("add_extra_token_to_sequence") = 1);
  m.def("build_sample_idx", &build_sample_idx, std::get<0>(sample_args), std::get<1>(sample_args),
        std::get<2>(sample_args), std::get<3>(sample_args), std::get<4>(sample_args), std::get<5>(sample_args),
        std::get<6>(sample_args), "Sample index, int32 unless positions or sizes need int64");
  m.def("build_sample_idx_int32", &build_sample_idx_typed<int32_t>, std::get<0>(sample_args),
        std::get<1>(sample_args), std::get<2>(sample_args), std::get<3>(sample_args), std::get<4>(sample_args),
        std::get<5>(sample_args), std::get<6>(sample_args));
  m.def("build_sample_idx_int64", &build_sample_idx_typed<int64_t>, std::get<0>(sample_args),
        std::get<1>(sample_args), std::get<2>(sample_args), std::get<3>(sample_args), std::get<4>(sample_args),
        std::get<5>(sample_args), std::get<6>(sample_args));
  m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"),
        py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"), py::arg("size"),
        py::arg("verbose") = false, "Fill dataset_index / dataset_sample_index in place");
}
