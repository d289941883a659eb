// qcompile_app: load a qcompile-built model library, run it on an input read from a .npy
// file (float32, C order, the model's input shape) and print the top-K classes in the
// format of `qcompile run --print-top K`.
//
//   qcompile_app MODEL.so INPUT.npy [K=5]
// Only tvm-ffi headers: the apache-tvm wheel's tvm/runtime/tensor.h needs headers it
// does not ship (tvm/support/io.h); libtvm_runtime.so is linked for the Relax VM.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Npy {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Minimal .npy reader: format 1.x/2.x, little-endian float32, C order (what numpy.save writes).
Npy ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::string(magic + 1, 5) != "NUMPY") throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    in.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  in.read(&header[0], header_len);
  if (header.find("'descr': '<f4'") == std::string::npos)
    throw std::runtime_error(path + ": expected float32 ('<f4') data, header: " + header);
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected C-order data");
  Npy npy;
  size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  for (std::string dim; std::getline(dims, dim, ',');)
    if (dim.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(dim));
  size_t count = std::accumulate(npy.shape.begin(), npy.shape.end(), int64_t{1}, std::multiplies<int64_t>());
  npy.data.resize(count);
  in.read(reinterpret_cast<char*>(npy.data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!in) throw std::runtime_error(path + ": truncated data");
  return npy;
}

// Host memory for input tensors, 64-byte aligned as TVM's kernels prefer.
struct HostAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (tvm::ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

tvm::ffi::Function Get(const tvm::ffi::Module& mod, const char* name) {
  auto f = mod->GetFunction(name);
  if (!f.has_value()) throw std::runtime_error(std::string("the library has no function ") + name);
  return f.value();
}

// The first output: the VM returns a tensor, or a tuple of them.
tvm::ffi::Tensor FirstOutput(const tvm::ffi::Any& out) {
  if (auto tensor = out.as<tvm::ffi::Tensor>()) return tensor.value();
  auto tuple = out.cast<tvm::ffi::Array<tvm::ffi::Any>>();
  return FirstOutput(tuple[0]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.so INPUT.npy [TOPK]\n", argv[0]);
    return 2;
  }
  const int k = argc > 3 ? std::stoi(argv[3]) : 5;
  try {
    Npy input = ReadNpy(argv[2]);
    DLDevice cpu{kDLCPU, 0};
    // The .so holds a Relax VM executable: load it, then initialise the VM on the CPU
    // (device type, id, allocator: 2 = pooled, as tvm.relax.VirtualMachine does).
    tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(argv[1]);
    tvm::ffi::Module vm = Get(lib, "vm_load_executable")().cast<tvm::ffi::Module>();
    Get(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2);

    tvm::ffi::Tensor x = tvm::ffi::Tensor::FromNDAlloc(HostAlloc(), tvm::ffi::Shape(input.shape),
                                                       DLDataType{kDLFloat, 32, 1}, cpu);
    std::memcpy(x.data_ptr(), input.data.data(), input.data.size() * sizeof(float));
    tvm::ffi::Tensor y = FirstOutput(Get(vm, "main")(x));

    const DLTensor* t = y.GetDLTensorPtr();
    if (t->device.device_type != kDLCPU) throw std::runtime_error("expected the output on the CPU");
    if (t->dtype.code != kDLFloat || t->dtype.bits != 32) throw std::runtime_error("expected a float32 output");
    int64_t rows = t->ndim > 1 ? t->shape[0] : 1, total = 1;
    for (int i = 0; i < t->ndim; ++i) total *= t->shape[i];
    std::vector<float> scores(static_cast<const float*>(t->data) + t->byte_offset / sizeof(float),
                              static_cast<const float*>(t->data) + t->byte_offset / sizeof(float) + total);
    const int64_t cols = total / rows;
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = scores.data() + r * cols;
      std::vector<int64_t> idx(cols);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [row](int64_t a, int64_t b) { return row[a] > row[b]; });
      std::printf("  batch %lld: ", static_cast<long long>(r));
      for (int i = 0; i < std::min<int64_t>(k, cols); ++i)
        std::printf("%s%lld:%.5g", i ? ", " : "", static_cast<long long>(idx[i]), row[idx[i]]);
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
