// One forward call of an ExecuTorch LLM program through ExecuTorch's own C++ Module, behind a C ABI
// that ctypes calls: tokens + start position in, float32 logits out. It replaces the pybind11 path
// (Method.execute), whose per-call cost (~50-70 us) is most of what separates a Python generation
// loop from ExecuTorch's C++ runner on small models. Built by runtimes/executorch_native.py against
// the installed executorch wheel's headers and libexecutorch.so, inside a process that has already
// loaded the wheel's Python bindings (which register the kernels and the XNNPACK backend).
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cstring>
#include <string>

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::from_blob;

namespace {
void report(char* err, int len, const std::string& msg) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, msg.c_str(), len - 1);
    err[len - 1] = 0;
  }
}
}  // namespace

extern "C" {

void* nima_et_open(const char* path, char* err, int errlen) {
  auto* module = new Module(path, Module::LoadMode::Mmap);
  auto status = module->load_forward();
  if (status != executorch::runtime::Error::Ok) {
    report(err, errlen, "loading forward failed with ExecuTorch error " + std::to_string(static_cast<int>(status)));
    delete module;
    return nullptr;
  }
  return module;
}

// tokens[n] at positions start.. ; logits of the last token into out[vocab]. 0 on success.
int nima_et_forward(void* handle, int64_t* tokens, int n, int64_t* start, float* out, int vocab, char* err,
                    int errlen) {
  auto* module = static_cast<Module*>(handle);
  auto result = module->forward({from_blob(tokens, {1, n}, ScalarType::Long), from_blob(start, {1}, ScalarType::Long)});
  if (!result.ok()) {
    report(err, errlen, "forward failed with ExecuTorch error " + std::to_string(static_cast<int>(result.error())));
    return 1;
  }
  const auto& logits = result.get()[0].toTensor();
  if (logits.scalar_type() != ScalarType::Float || logits.numel() != vocab) {
    report(err, errlen, "forward returned " + std::to_string(logits.numel()) + " values of type " +
                            std::to_string(static_cast<int>(logits.scalar_type())) + ", not " + std::to_string(vocab) +
                            " float32 logits");
    return 2;
  }
  std::memcpy(out, logits.const_data_ptr<float>(), sizeof(float) * vocab);
  return 0;
}

void nima_et_close(void* handle) { delete static_cast<Module*>(handle); }

}  // extern "C"
