#include "engine/build_info.h"

namespace anemll {

bool have_coreml_backend() {
#ifdef ANEMLL_FAST_HAVE_COREML
  return true;
#else
  return false;
#endif
}

const char* build_description() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown compiler";
#endif
}

}  // namespace anemll
