// What this build of the native engine contains; read by the Python façade
// to pick a backend and to report itself in `anemll-fast inspect`.
#pragma once

namespace anemll {

// Bumped whenever the engine <-> backend C ABI changes.
constexpr int kAbiVersion = 1;

// True when the Objective-C++ CoreML backend was compiled in (macOS only).
bool have_coreml_backend();

// A short human-readable description of the compiler and target.
const char* build_description();

}  // namespace anemll
